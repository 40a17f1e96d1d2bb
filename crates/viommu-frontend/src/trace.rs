//! Request traces captured from real guests (`../shared/traces/README.md`):
//! one request per line, gzip-compressed or plain text, e.g.
//!
//! ```text
//! virtio_iommu_attach domain=0 endpoint=32
//! virtio_iommu_map domain=0 virt_start=0xffffe000 virt_end=0xffffffff phys_start=0x4b42000 flags=3
//! virtio_iommu_unmap domain=0 virt_start=0xffffa000 virt_end=0xffffafff
//! virtio_iommu_detach domain=0 endpoint=32
//! virtio_iommu_probe endpoint=32
//! ```
//!
//! Numbers are decimal or `0x` hexadecimal. Blank lines and lines starting
//! with `#` are skipped. Every field of an event is required; unknown or
//! repeated fields are errors.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use virtio_iommu_proto::{Attach, Detach, Map, MapFlags, Probe, Request, Unmap};

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be opened.
    #[error("cannot open trace {path}")]
    Open {
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Reading (or decompressing) failed.
    #[error("cannot read trace line {line}")]
    Read {
        /// 1-based line number.
        line: usize,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not a request.
    #[error("trace line {line}: {kind}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        kind: LineError,
    },
}

/// What is wrong with one line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// The first word is not a known event.
    #[error("unknown event `{0}`")]
    UnknownEvent(String),
    /// A word is not `name=value`.
    #[error("`{0}` is not name=value")]
    NotAField(String),
    /// A field the event does not have.
    #[error("unknown field `{0}`")]
    UnknownField(String),
    /// A field given twice.
    #[error("field `{0}` given twice")]
    DuplicateField(String),
    /// A required field is absent.
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    /// A value is not a number that fits the field.
    #[error("field `{field}`: `{value}` is not a valid number")]
    BadNumber {
        /// The field.
        field: &'static str,
        /// Its text.
        value: String,
    },
}

fn parse_u64(field: &'static str, value: &str) -> Result<u64, LineError> {
    vhost_user_process::number::parse_u64(value).map_err(|_| LineError::BadNumber {
        field,
        value: value.to_string(),
    })
}

/// The fields of one line, looked up by name.
struct Fields<'a> {
    names: &'static [&'static str],
    values: Vec<Option<&'a str>>,
}

impl<'a> Fields<'a> {
    fn parse(names: &'static [&'static str], words: &[&'a str]) -> Result<Self, LineError> {
        let mut values = vec![None; names.len()];
        for w in words {
            let (name, value) = w
                .split_once('=')
                .ok_or_else(|| LineError::NotAField((*w).to_string()))?;
            let i = names
                .iter()
                .position(|n| *n == name)
                .ok_or_else(|| LineError::UnknownField(name.to_string()))?;
            if values[i].replace(value).is_some() {
                return Err(LineError::DuplicateField(name.to_string()));
            }
        }
        Ok(Fields { names, values })
    }

    fn u64(&self, name: &'static str) -> Result<u64, LineError> {
        let i = self
            .names
            .iter()
            .position(|n| *n == name)
            .ok_or(LineError::MissingField(name))?;
        let v = self.values[i].ok_or(LineError::MissingField(name))?;
        parse_u64(name, v)
    }

    fn u32(&self, name: &'static str) -> Result<u32, LineError> {
        let v = self.u64(name)?;
        u32::try_from(v).map_err(|_| LineError::BadNumber {
            field: name,
            value: v.to_string(),
        })
    }
}

/// Parses one line; `Ok(None)` for blank and comment lines.
pub fn parse_line(line: &str) -> Result<Option<Request>, LineError> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let (event, rest) = words
        .split_first()
        .ok_or(LineError::MissingField("event"))?;
    let req = match *event {
        "virtio_iommu_attach" => {
            let f = Fields::parse(&["domain", "endpoint", "flags"], rest)?;
            let flags = match f.values[2] {
                Some(_) => f.u32("flags")?,
                None => 0,
            };
            Request::Attach(Attach {
                domain: f.u32("domain")?,
                endpoint: f.u32("endpoint")?,
                flags,
                reserved: [0; 4],
            })
        }
        "virtio_iommu_detach" => {
            let f = Fields::parse(&["domain", "endpoint"], rest)?;
            Request::Detach(Detach {
                domain: f.u32("domain")?,
                endpoint: f.u32("endpoint")?,
            })
        }
        "virtio_iommu_map" => {
            let f = Fields::parse(
                &["domain", "virt_start", "virt_end", "phys_start", "flags"],
                rest,
            )?;
            Request::Map(Map {
                domain: f.u32("domain")?,
                virt_start: f.u64("virt_start")?,
                virt_end: f.u64("virt_end")?,
                phys_start: f.u64("phys_start")?,
                flags: MapFlags(f.u32("flags")?),
            })
        }
        "virtio_iommu_unmap" => {
            let f = Fields::parse(&["domain", "virt_start", "virt_end"], rest)?;
            Request::Unmap(Unmap {
                domain: f.u32("domain")?,
                virt_start: f.u64("virt_start")?,
                virt_end: f.u64("virt_end")?,
                reserved: [0; 4],
            })
        }
        "virtio_iommu_probe" => {
            let f = Fields::parse(&["endpoint"], rest)?;
            Request::Probe(Probe {
                endpoint: f.u32("endpoint")?,
            })
        }
        other => return Err(LineError::UnknownEvent(other.to_string())),
    };
    Ok(Some(req))
}

/// Parses a whole trace from a reader (plain text).
pub fn parse_reader(reader: impl BufRead) -> Result<Vec<Request>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| TraceError::Read {
            line: line_no,
            source,
        })?;
        match parse_line(&line) {
            Ok(Some(req)) => out.push(req),
            Ok(None) => {}
            Err(kind) => {
                return Err(TraceError::BadLine {
                    line: line_no,
                    kind,
                });
            }
        }
    }
    Ok(out)
}

/// Reads a trace file, gzip-compressed (detected by its magic bytes) or plain.
pub fn load(path: &Path) -> Result<Vec<Request>, TraceError> {
    let file = std::fs::File::open(path).map_err(|source| TraceError::Open {
        path: path.display().to_string(),
        source,
    })?;
    load_from(file)
}

/// Reads a trace from any byte source (gzip or plain).
pub fn load_from(reader: impl Read) -> Result<Vec<Request>, TraceError> {
    let mut r = BufReader::new(reader);
    let gzip = r
        .fill_buf()
        .map_err(|source| TraceError::Read { line: 1, source })?
        .starts_with(&[0x1f, 0x8b]);
    if gzip {
        parse_reader(BufReader::new(flate2::bufread::GzDecoder::new(r)))
    } else {
        parse_reader(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const SAMPLE: &str = "\
virtio_iommu_attach domain=0 endpoint=32
virtio_iommu_map domain=0 virt_start=0xffffe000 virt_end=0xffffffff phys_start=0x4b42000 flags=3

# a comment
virtio_iommu_unmap domain=0 virt_start=0xffffa000 virt_end=0xffffafff
virtio_iommu_detach domain=0 endpoint=32
virtio_iommu_probe endpoint=0x20
";

    #[test]
    fn parses_every_event_in_hex_and_decimal() {
        let reqs = load_from(SAMPLE.as_bytes()).unwrap();
        assert_eq!(
            reqs,
            vec![
                Request::Attach(Attach {
                    domain: 0,
                    endpoint: 32,
                    flags: 0,
                    reserved: [0; 4]
                }),
                Request::Map(Map {
                    domain: 0,
                    virt_start: 0xffff_e000,
                    virt_end: 0xffff_ffff,
                    phys_start: 0x4b4_2000,
                    flags: MapFlags(3)
                }),
                Request::Unmap(Unmap {
                    domain: 0,
                    virt_start: 0xffff_a000,
                    virt_end: 0xffff_afff,
                    reserved: [0; 4]
                }),
                Request::Detach(Detach {
                    domain: 0,
                    endpoint: 32
                }),
                Request::Probe(Probe { endpoint: 32 }),
            ]
        );
    }

    #[test]
    fn gzip_is_detected() {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(SAMPLE.as_bytes()).unwrap();
        let gz = enc.finish().unwrap();
        assert_eq!(load_from(&gz[..]).unwrap().len(), 5);
    }

    #[test]
    fn bad_lines_name_their_line_and_fault() {
        let cases: &[(&str, LineError)] = &[
            (
                "virtio_iommu_frob domain=0",
                LineError::UnknownEvent("virtio_iommu_frob".into()),
            ),
            (
                "virtio_iommu_attach domain=0",
                LineError::MissingField("endpoint"),
            ),
            (
                "virtio_iommu_attach domain=0 endpoint=1 colour=red",
                LineError::UnknownField("colour".into()),
            ),
            (
                "virtio_iommu_attach domain=0 domain=1 endpoint=1",
                LineError::DuplicateField("domain".into()),
            ),
            (
                "virtio_iommu_attach domain endpoint=1",
                LineError::NotAField("domain".into()),
            ),
            (
                "virtio_iommu_map domain=0 virt_start=0xzz virt_end=1 phys_start=0 flags=1",
                LineError::BadNumber {
                    field: "virt_start",
                    value: "0xzz".into(),
                },
            ),
            (
                "virtio_iommu_attach domain=0x100000000 endpoint=1",
                LineError::BadNumber {
                    field: "domain",
                    value: "4294967296".into(),
                },
            ),
            (
                "virtio_iommu_unmap domain=0 virt_start=1 virt_end=-1",
                LineError::BadNumber {
                    field: "virt_end",
                    value: "-1".into(),
                },
            ),
        ];
        for (bad, want) in cases {
            let text = format!("virtio_iommu_attach domain=0 endpoint=32\n\n{bad}\n");
            match load_from(text.as_bytes()) {
                Err(TraceError::BadLine { line, kind }) => {
                    assert_eq!(line, 3, "{bad}");
                    assert_eq!(&kind, want, "{bad}");
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
        let e = load_from("virtio_iommu_probe\n".as_bytes()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "trace line 1: missing field `endpoint`",
            "display names the line"
        );
    }

    #[test]
    fn missing_file_is_an_open_error() {
        assert!(matches!(
            load(Path::new("/nonexistent/trace.gz")),
            Err(TraceError::Open { .. })
        ));
    }
}
