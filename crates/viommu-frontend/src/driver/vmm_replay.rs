//! Replays what a VMM sent, as recorded by `tests/guest/vhost-user-trace.py`
//! (`tests/guest/recorded/`), against the device: the recorded messages in
//! their order, with this driver's rings, memory, eventfds and features in
//! place of the recorded guest's.
//!
//! A recording is cut into sections at its `## ` marker lines (what the
//! host or the guest did). Queue state follows the recording: a
//! `GET_VRING_BASE` keeps the device's answer, and a later `SET_VRING_BASE`
//! resumes there; a `SET_VRING_BASE` of 0 on a queue that had moved means
//! the recorded guest started over, so this driver does too (new rings).

use super::{Driver, DriverError, Queue};

/// One recorded frontend message, as far as replay needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// SET_VRING_ENABLE.
    Enable {
        /// Queue index.
        index: usize,
        /// Enable or disable.
        on: bool,
    },
    /// GET_VRING_BASE (stops the queue).
    GetBase {
        /// Queue index.
        index: usize,
    },
    /// GET_CONFIG.
    GetConfig {
        /// First byte.
        offset: u32,
        /// Bytes.
        size: u32,
    },
    /// SET_FEATURES (this driver's acked features are sent).
    SetFeatures,
    /// SET_MEM_TABLE (this driver's RAM).
    SetMemTable,
    /// SET_VRING_NUM.
    SetNum {
        /// Queue index.
        index: usize,
    },
    /// SET_VRING_BASE with the recorded base.
    SetBase {
        /// Queue index.
        index: usize,
        /// The recorded base (0: the guest starts over).
        base: u16,
    },
    /// SET_VRING_ADDR.
    SetAddr {
        /// Queue index.
        index: usize,
    },
    /// SET_VRING_KICK.
    SetKick {
        /// Queue index.
        index: usize,
    },
    /// SET_VRING_CALL.
    SetCall {
        /// Queue index.
        index: usize,
    },
}

/// A recording cut at its markers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// The marker's text (empty for what comes before the first marker).
    pub title: String,
    /// The messages, in order. Connection set-up messages (GET_FEATURES,
    /// SET_OWNER, ...) are left out: [`Driver::connect`] sends its own.
    pub steps: Vec<Step>,
}

/// A recording line that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("recording line {line}: {why}: {text:?}")]
pub struct RecordingError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub why: &'static str,
    /// The line.
    pub text: String,
}

/// Messages sent only while connecting, which replay leaves out.
const CONNECT_ONLY: &[&str] = &[
    "GET_FEATURES",
    "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES",
    "GET_QUEUE_NUM",
    "SET_OWNER",
    "SET_VRING_ERR",
    "SET_BACKEND_REQ_FD",
    "GET_MAX_MEM_SLOTS",
];

/// Parses a recording into sections.
pub fn parse_recording(text: &str) -> Result<Vec<Section>, RecordingError> {
    let mut sections = vec![Section {
        title: String::new(),
        steps: Vec::new(),
    }];
    for (n, raw) in text.lines().enumerate() {
        let err = |why| RecordingError {
            line: n + 1,
            why,
            text: raw.to_string(),
        };
        if let Some(title) = raw.strip_prefix("## ") {
            sections.push(Section {
                title: title.to_string(),
                steps: Vec::new(),
            });
            continue;
        }
        if raw.starts_with('#') || raw.trim().is_empty() {
            continue;
        }
        let mut words = raw.split_whitespace();
        let _seconds = words.next();
        let Some(name) = words.next() else {
            return Err(err("no message name"));
        };
        if name == "reply" || name == "--" || CONNECT_ONLY.contains(&name) {
            continue;
        }
        let field = |key: &str| -> Option<u64> {
            raw.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        let index = || {
            field("index")
                .and_then(|i| usize::try_from(i).ok())
                .ok_or(err("no queue index"))
        };
        let step = match name {
            "SET_VRING_ENABLE" => Step::Enable {
                index: index()?,
                on: field("num").ok_or(err("no num"))? != 0,
            },
            "GET_VRING_BASE" => Step::GetBase { index: index()? },
            "GET_CONFIG" => Step::GetConfig {
                offset: field("offset").ok_or(err("no offset"))? as u32,
                size: field("size").ok_or(err("no size"))? as u32,
            },
            "SET_FEATURES" => Step::SetFeatures,
            "SET_MEM_TABLE" => Step::SetMemTable,
            "SET_VRING_NUM" => Step::SetNum { index: index()? },
            "SET_VRING_BASE" => Step::SetBase {
                index: index()?,
                base: field("num")
                    .and_then(|b| u16::try_from(b).ok())
                    .ok_or(err("no base"))?,
            },
            "SET_VRING_ADDR" => Step::SetAddr { index: index()? },
            "SET_VRING_KICK" => Step::SetKick { index: index()? },
            "SET_VRING_CALL" => Step::SetCall { index: index()? },
            _ => return Err(err("a message replay does not know")),
        };
        if let Some(last) = sections.last_mut() {
            last.steps.push(step);
        }
    }
    Ok(sections)
}

/// Queue state carried between sections.
#[derive(Debug, Default)]
pub struct VmmReplay {
    /// The device's answers to GET_VRING_BASE, per queue.
    bases: [u16; 2],
}

impl VmmReplay {
    /// Sends `steps` to the device through `drv`'s connection.
    pub fn run(&mut self, drv: &mut Driver, steps: &[Step]) -> Result<(), DriverError> {
        for &step in steps {
            match step {
                Step::Enable { index, on } => drv.conn.enable_vring(index, on)?,
                Step::GetBase { index } => {
                    let base = drv.conn.get_vring_base(index)?;
                    if let Some(b) = self.bases.get_mut(index) {
                        *b = base;
                    }
                }
                Step::GetConfig { offset, size } => {
                    drv.conn.read_config(offset, size)?;
                }
                Step::SetFeatures => drv.conn.set_features(drv.acked)?,
                Step::SetMemTable => drv.conn.set_mem_table(&drv.ram)?,
                Step::SetNum { index } => {
                    let size = pick(&drv.reqq, &drv.evq, index)?.ring.addrs().size;
                    drv.conn.set_vring_num(index, size)?;
                }
                Step::SetBase { index, base } => {
                    let moved = pick(&drv.reqq, &drv.evq, index)?.ring.published() != 0;
                    let resume = if base == 0 {
                        if moved {
                            // The recorded guest started over: so does this one.
                            let event_idx = drv.acked
                                & (1 << virtio_iommu_proto::features::VIRTIO_RING_F_EVENT_IDX)
                                != 0;
                            let fresh = Queue::new(&mut drv.ram, drv.opts.queue_size, event_idx)?;
                            *queue_mut(drv, index)? = fresh;
                        }
                        0
                    } else {
                        self.bases.get(index).copied().unwrap_or(0)
                    };
                    drv.conn.set_vring_base(index, resume)?;
                }
                Step::SetAddr { index } => {
                    let addrs = pick(&drv.reqq, &drv.evq, index)?.ring.addrs();
                    drv.conn.set_vring_addr(index, &drv.ram, &addrs)?;
                }
                Step::SetKick { index } => {
                    let q = pick(&drv.reqq, &drv.evq, index)?;
                    drv.conn.set_vring_kick(index, &q.kick)?;
                }
                Step::SetCall { index } => {
                    let q = pick(&drv.reqq, &drv.evq, index)?;
                    drv.conn.set_vring_call(index, &q.call)?;
                }
            }
        }
        Ok(())
    }
}

fn pick<'q>(reqq: &'q Queue, evq: &'q Queue, index: usize) -> Result<&'q Queue, DriverError> {
    match index {
        0 => Ok(reqq),
        1 => Ok(evq),
        _ => Err(DriverError::Replay(format!("no queue {index}"))),
    }
}

fn queue_mut(drv: &mut Driver, index: usize) -> Result<&mut Queue, DriverError> {
    match index {
        0 => Ok(&mut drv.reqq),
        1 => Ok(&mut drv.evq),
        _ => Err(DriverError::Replay(format!("no queue {index}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_split_at_markers_and_skip_connection_set_up() {
        let text = "# header\n    0.1 -- connected\n    0.1 GET_FEATURES\n    0.2 GET_CONFIG offset=0 size=40\n\
                    ## host: stop\n    1.0 SET_VRING_ENABLE index=0 num=0\n    1.0 GET_VRING_BASE index=0\n\
                    \x20   1.0   reply GET_VRING_BASE index=0 num=7\n## host: cont\n    2.0 SET_VRING_BASE index=0 num=7\n";
        let s = parse_recording(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0].steps,
            vec![Step::GetConfig {
                offset: 0,
                size: 40
            }]
        );
        assert_eq!(s[1].title, "host: stop");
        assert_eq!(
            s[1].steps,
            vec![
                Step::Enable {
                    index: 0,
                    on: false
                },
                Step::GetBase { index: 0 }
            ]
        );
        assert_eq!(s[2].steps, vec![Step::SetBase { index: 0, base: 7 }]);
    }

    #[test]
    fn unknown_or_incomplete_lines_are_errors() {
        let e = parse_recording("    1.0 SEND_RARP\n").unwrap_err();
        assert_eq!(e.line, 1);
        let e = parse_recording("# comment\n    1.0 SET_VRING_BASE index=0\n").unwrap_err();
        assert_eq!((e.line, e.why), (2, "no base"));
        assert!(parse_recording("    1.0 SET_VRING_NUM num=64\n").is_err());
        assert_eq!(
            parse_recording("lonely\n").unwrap_err().why,
            "no message name"
        );
    }
}
