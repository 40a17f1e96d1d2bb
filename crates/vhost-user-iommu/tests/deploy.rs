//! The deployment files agree with the daemon: the QEMU/libvirt backend
//! descriptor with `--print-capabilities` and QEMU's `vhost-user.json`
//! schema, the socket unit with the service it starts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::daemon_bin;
use std::path::PathBuf;
use std::process::Command;

fn deploy(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn capabilities() -> serde_json::Value {
    let out = Command::new(daemon_bin())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `VhostUserBackend` in QEMU's docs/interop/vhost-user.json: `description`,
/// `type` and `binary` (strings) required, `tags` (strings) optional,
/// nothing else.
#[test]
fn the_backend_descriptor_follows_the_schema_and_the_binary() {
    let d: serde_json::Value = serde_json::from_str(&deploy("50-vhost-user-iommu.json")).unwrap();
    let d = d.as_object().expect("one object");
    for key in d.keys() {
        assert!(
            ["description", "type", "binary", "tags"].contains(&key.as_str()),
            "{key} is not a VhostUserBackend member"
        );
    }
    for key in ["description", "type", "binary"] {
        assert!(d.get(key).is_some_and(|v| v.is_string()), "{key} missing");
    }
    let binary = PathBuf::from(d["binary"].as_str().unwrap());
    assert!(binary.is_absolute());
    assert_eq!(binary.file_name(), daemon_bin().file_name(), "{binary:?}");
    let tags: Vec<&str> = d["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().expect("tags are strings"))
        .collect();
    let caps = capabilities();
    assert_eq!(
        d["type"], caps["type"],
        "the type --print-capabilities prints"
    );
    // Any feature the daemon announces is named in the descriptor too.
    for f in caps["features"].as_array().into_iter().flatten() {
        assert!(
            tags.contains(&f.as_str().unwrap()),
            "feature {f} not in tags"
        );
    }
    // The generic device's parameters, as docs/qemu.md gives them.
    for t in ["virtio-id=23", "num_vqs=2", "config_size=40"] {
        assert!(tags.contains(&t), "{t} missing from tags");
        let qemu = std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/qemu.md"),
        )
        .unwrap();
        assert!(qemu.contains(t), "docs/qemu.md does not use {t}");
    }
}

fn key<'a>(unit: &'a str, name: &str) -> Option<&'a str> {
    unit.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn the_socket_unit_hands_the_service_the_vmm_socket_as_fd_3() {
    let socket = deploy("vhost-user-iommu@.socket");
    let service = deploy("vhost-user-iommu@.service");
    assert_eq!(
        key(&socket, "ListenStream"),
        Some("/run/vhost-user-iommu/%i.sock")
    );
    assert_eq!(key(&socket, "SocketMode"), Some("0660"));
    assert_eq!(key(&socket, "SocketGroup"), Some("kvm"));
    assert_eq!(
        key(&socket, "Accept"),
        Some("no"),
        "one daemon, not one per connection"
    );
    assert_eq!(
        key(&socket, "FileDescriptorName"),
        Some(vhost_user_process::activation::VMM_FD_NAME)
    );
    assert_eq!(
        key(&service, "Requires"),
        Some("vhost-user-iommu@%i.socket")
    );
    assert!(service.contains("--fd 3"), "{service}");
    // The backend socket sits in the directory the socket unit creates.
    assert!(service.contains("--backend-socket /run/vhost-user-iommu/"));
    for option in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "MemoryDenyWriteExecute=yes",
        "User=vhost-user-iommu",
        "CapabilityBoundingSet=",
    ] {
        assert!(service.lines().any(|l| l == option), "{option} missing");
    }
}
