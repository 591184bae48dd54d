//! `ctnetlink`: conntrack netlink messages from the kernel, as the
//! conntrack source reads them (`nicsync_conntrack`): one datagram of one
//! or more netlink messages, each parsed into a conntrack entry, and every
//! entry that parses mapped onto nicsync's connection record and back.
//!
//! Input: the datagram.
//!
//! Checks: nothing panics or allocates without bound; a record that maps
//! from the kernel's entry maps back to an entry whose key maps to the same
//! record key.

use nicsync_conntrack::wire::NlMsgs;
use nicsync_conntrack::{from_ct, parse, parse_msg, to_ct};

/// The target.
pub fn run(data: &[u8]) {
    let _ = parse(data);
    for msg in NlMsgs::new(data).take(1024) {
        let Ok(msg) = msg else { break };
        let Ok((_, entry)) = parse_msg(&msg) else { continue };
        if let Ok(m) = from_ct(&entry) {
            let Ok(back) = to_ct(&m.key, &m.state, &m.nat) else { continue };
            if let Ok(again) = from_ct(&back) {
                assert!(again.key == m.key, "key changed through to_ct/from_ct: {:?} -> {:?}", m.key, again.key);
            }
        }
    }
}
