//! `docs/abi.md` must agree with the ABI as this crate defines it.
//!
//! Every table that can be derived from the code (register map, counters,
//! bit flags, enumerations, opcodes, status codes, constants and the layout
//! of every wire struct) is rendered here as markdown and compared with the
//! text between `<!-- BEGIN GENERATED: NAME -->` and
//! `<!-- END GENERATED: NAME -->` in the document. Offsets, sizes, values,
//! names and the set of rows come from the code (`regs::REGISTERS`,
//! `Counter::ALL`, `offset_of!`, `from_wire` probed over all 256 bytes,
//! `DescFlags` probed through `CommandDescriptor::decode`); the one-line
//! meanings are kept here, in exhaustive matches or lookups that fail when
//! the code gains a variant, flag or field that has none.
//!
//! To regenerate the sections after changing the ABI:
//!
//! ```text
//! NICSYNC_BLESS=1 cargo test -p nicsync-fwif --test abi_doc
//! ```
//!
//! then review the diff of `docs/abi.md` (the prose around the tables is
//! not regenerated).

use std::fmt::Write as _;
use std::path::PathBuf;

use nicsync_fwif::cmd::{
    CommandDescriptor, ConnBody, DecodeError, DescFlags, ExtBody, LoadBody, LoadStatus, LookupBody, Opcode,
    PositionsBody, SnapshotBody, SyncPosition, DESC_SIZE, LOAD_MAX_RECORDS, MAX_POSITIONS, SNAPSHOT_DONE,
};
use nicsync_fwif::conn::{
    ConnFlags, ConnKey, ConnRecord, ConnState, Direction, Nat, NatKind, TcpState, FAMILY_IPV4, FAMILY_IPV6,
};
use nicsync_fwif::cpl::{CompletionEntry, CplStatus, CPL_SIZE, PHASE_BIT};
use nicsync_fwif::event::{EventEntry, EventKind, EVT_SIZE};
use nicsync_fwif::regs::{self, Capabilities, Control, Counter, IrqCause, Status};
use zerocopy::FromZeros;

// ---------------------------------------------------------------------------
// Markdown rendering
// ---------------------------------------------------------------------------

/// Escapes a table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A markdown table.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for r in rows {
        assert_eq!(r.len(), header.len(), "row {r:?} does not fit header {header:?}");
        let cells: Vec<String> = r.iter().map(|c| cell(c)).collect();
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

fn hex3(v: u32) -> String {
    format!("0x{v:03X}")
}

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

fn render_constants() -> String {
    let rows: Vec<Vec<String>> = [
        ("BAR0_SIZE", format!("0x{:X}", regs::BAR0_SIZE), "bytes of BAR0 (32-bit registers)"),
        (
            "DEVICE_ID_VALUE",
            format!("0x{:08X}", regs::DEVICE_ID_VALUE),
            "DEVICE_ID contents, ASCII \"NSYC\" little-endian",
        ),
        ("ABI_MAJOR", nicsync_fwif::ABI_MAJOR.to_string(), "ABI major version of this document"),
        ("ABI_MINOR", nicsync_fwif::ABI_MINOR.to_string(), "ABI minor version of this document"),
        ("COUNTER_BASE", hex3(regs::COUNTER_BASE), "offset of counter 0 (low half)"),
        ("DESC_SIZE", DESC_SIZE.to_string(), "bytes per command descriptor (command ring slot)"),
        ("CPL_SIZE", CPL_SIZE.to_string(), "bytes per completion entry"),
        ("EVT_SIZE", EVT_SIZE.to_string(), "bytes per event entry"),
        ("ConnRecord::SIZE", ConnRecord::SIZE.to_string(), "bytes per connection record (LOOKUP, SNAPSHOT)"),
        ("PHASE_BIT", format!("0x{PHASE_BIT:02X}"), "mask of the phase bit in a completion's or event's `phase` byte"),
        ("SNAPSHOT_DONE", format!("0x{SNAPSHOT_DONE:08X}"), "SNAPSHOT next cursor meaning \"walk finished\""),
        ("LOAD_MAX_RECORDS", LOAD_MAX_RECORDS.to_string(), "most sync records one LOAD applies"),
        ("MIN_LOG2_RING", regs::MIN_LOG2_RING.to_string(), "smallest accepted `*_LOG2_SIZE`"),
        ("MAX_LOG2_RING", regs::MAX_LOG2_RING.to_string(), "largest accepted `*_LOG2_SIZE`"),
        ("VECTOR_COMPLETION", regs::VECTOR_COMPLETION.to_string(), "MSI-X vector for COMPLETION"),
        ("VECTOR_EVENT", regs::VECTOR_EVENT.to_string(), "MSI-X vector for EVENT and ERROR"),
        ("VECTOR_COUNT", regs::VECTOR_COUNT.to_string(), "MSI-X vectors used"),
        ("FAMILY_IPV4", FAMILY_IPV4.to_string(), "`family` byte of an IPv4 key or NAT address"),
        ("FAMILY_IPV6", FAMILY_IPV6.to_string(), "`family` byte of an IPv6 key or NAT address"),
    ]
    .into_iter()
    .map(|(n, v, m)| vec![format!("`{n}`"), v, m.to_string()])
    .collect();
    table(&["Constant", "Value", "Meaning"], &rows)
}

// ---------------------------------------------------------------------------
// Registers and counters
// ---------------------------------------------------------------------------

fn render_registers() -> String {
    let rows: Vec<Vec<String>> = regs::REGISTERS
        .iter()
        .map(|r| vec![hex3(r.offset), format!("`{}`", r.name), r.access.to_string(), r.summary.to_string()])
        .collect();
    let mut rows = rows;
    let last = Counter::ALL[Counter::ALL.len() - 1].offset() + 4;
    rows.push(vec![
        format!("{}–{}", hex3(regs::COUNTER_BASE), hex3(last)),
        "counters".to_string(),
        "RO".to_string(),
        "64-bit counters as low/high pairs (table below)".to_string(),
    ]);
    table(&["Offset", "Name", "Access", "Meaning"], &rows)
}

fn counter_meaning(c: Counter) -> &'static str {
    match c {
        Counter::CommandsFetched => "command ring slots fetched (an INSERT+EXT pair counts 2)",
        Counter::CompletionsWritten => "completion entries written",
        Counter::CommandErrors => "commands that completed with a status other than SUCCESS",
        Counter::CommandsMalformed => "commands completed MALFORMED or INVALID_OPCODE",
        Counter::DmaErrors => {
            "buffer accesses of LOOKUP, SNAPSHOT, LOAD, SYNC_POSITIONS and SYNC_ALIGN outside every IOMMU window"
        }
        Counter::TableFull => "inserts refused with TABLE_FULL, and peer updates that did not fit the table",
        Counter::EntriesAged => "entries removed by the aging scanner",
        Counter::EventsWritten => "event entries written (every kind)",
        Counter::EventsDropped => "events lost because the event ring was full or absent",
        Counter::Interrupts => "interrupt messages sent",
        Counter::ModelCycles => "modelled core clock cycles spent on command fetch and execution",
        Counter::CuckooKicks => "cuckoo displacements performed by inserts",
        Counter::Doorbells => "CMD_DOORBELL writes with a tail inside the ring (a repeated tail included)",
        Counter::BadDoorbells => "CMD_DOORBELL writes with a tail >= ring size (ignored)",
        Counter::InlineDoorbells => "inline doorbells whose descriptor copy replaced the DMA fetch",
        Counter::InlineMisses => "inline doorbells whose copy was torn or stale (descriptor fetched by DMA)",
        Counter::SyncUpdatesSent => "Delta Sync: local updates sent to the peers for the first time",
        Counter::SyncUpdatesReceived => "Delta Sync: peer updates received in order, each once",
        Counter::SyncUpdatesApplied => "Delta Sync: peer updates applied to the table",
        Counter::SyncRetransRequestsSent => "Delta Sync: ranges asked for again (NACK ranges sent)",
        Counter::SyncRetransUpdatesSent => "Delta Sync: updates sent again in answer to peers' NACKs",
        Counter::SyncLostUpdates => "Delta Sync: peer updates that can no longer be recovered (RESYNC_NEEDED raised)",
        Counter::SyncNextSeq => {
            "gauge: sequence number of the next local update; a SNAPSHOT walk started after reading it holds \
             every change numbered below it"
        }
        Counter::SyncHeld => "gauge: peer updates held while CONTROL.SYNC_HOLD is set",
        Counter::SyncHoldDrops => "held updates dropped when the hold buffer overflowed (RESYNC_NEEDED raised)",
        Counter::SyncApplyFailed => "peer updates that did not fit the table (RESYNC_NEEDED raised)",
        Counter::SyncMalformed => "sync datagrams refused as malformed",
        Counter::SyncDigest => "gauge: order-independent digest of the entries marked for sync (see regs.rs)",
        Counter::SyncEntries => "gauge: entries marked for sync",
        Counter::SyncQueueDepth => "gauge: updates in the retransmit queue",
        Counter::SyncQueueDrops => "frames dropped on a full transmit queue, updates dropped on a full reorder buffer",
        Counter::SyncRejectsSent => "updates reported to a peer as no longer resendable (LOST answers)",
        Counter::SyncAuthFailures => {
            "sync security: sealed frames that failed authentication (bad tag, unknown key id, inner sender differs)"
        }
        Counter::SyncReplaysDropped => "sync security: authentic frames dropped by the per-sender replay window",
        Counter::SyncUnknownMember => "sync security: frames naming a member id that is not a configured peer",
        Counter::LoadRecords => "LOAD (ABI 1.6): sync records examined, whatever their status",
        Counter::LoadRecordsMalformed => "LOAD (ABI 1.6): sync records refused as MALFORMED",
        Counter::SyncHistoryLost => {
            "ABI 1.7: updates a peer sent before this joining member followed it and no longer had (not in sync_lost_updates)"
        }
        Counter::SyncHistoryCovered => {
            "ABI 1.8: updates a peer sent before this joining member followed it that a Full Sync's cut (SYNC_ALIGN) covered, never asked for"
        }
        Counter::SyncSubmitFailed => {
            "ABI 1.10: local changes marked for sync that the sync unit could not send (the peers never see them; 0 unless the design is at fault)"
        }
        Counter::SyncUnacked => {
            "gauge: local updates some configured peer heard within 3 ALIVE intervals has not acknowledged yet (drain before replacing the table, or stopping)"
        }
    }
}

fn render_counters() -> String {
    let rows: Vec<Vec<String>> = Counter::ALL
        .iter()
        .enumerate()
        .map(|(i, c)| {
            vec![
                i.to_string(),
                hex3(c.offset()),
                hex3(c.offset() + 4),
                format!("`{}`", c.name()),
                counter_meaning(*c).to_string(),
            ]
        })
        .collect();
    table(&["Index", "Low", "High", "Name", "Meaning"], &rows)
}

// ---------------------------------------------------------------------------
// Bit flags
// ---------------------------------------------------------------------------

/// Renders the flags of one bitflags type; every flag must have a meaning
/// in `meanings` and every meaning must name a flag.
fn flags_table(type_name: &str, flags: Vec<(&'static str, u32)>, meanings: &[(&str, &str)]) -> String {
    let mut rows = Vec::new();
    for (name, bits) in &flags {
        assert_eq!(bits.count_ones(), 1, "{type_name}::{name} is not a single bit");
        let meaning = meanings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| *m)
            .unwrap_or_else(|| panic!("{type_name}::{name} has no meaning in tests/abi_doc.rs"));
        rows.push(vec![
            bits.trailing_zeros().to_string(),
            format!("0x{bits:02X}"),
            format!("`{name}`"),
            meaning.into(),
        ]);
    }
    for (n, _) in meanings {
        assert!(flags.iter().any(|(f, _)| f == n), "tests/abi_doc.rs describes {type_name}::{n}, which does not exist");
    }
    let defined: u32 = flags.iter().map(|(_, b)| b).fold(0, |a, b| a | b);
    let mut out = table(&["Bit", "Mask", "Name", "Meaning"], &rows);
    let _ = writeln!(out, "\nDefined bits: `0x{defined:02X}`; all other bits are reserved.");
    out
}

fn names32<F: bitflags::Flags<Bits = u32>>() -> Vec<(&'static str, u32)> {
    F::all().iter_names().map(|(n, f)| (n, f.bits())).collect()
}

fn names16<F: bitflags::Flags<Bits = u16>>() -> Vec<(&'static str, u32)> {
    F::all().iter_names().map(|(n, f)| (n, u32::from(f.bits()))).collect()
}

fn names8<F: bitflags::Flags<Bits = u8>>() -> Vec<(&'static str, u32)> {
    F::all().iter_names().map(|(n, f)| (n, u32::from(f.bits()))).collect()
}

fn render_capabilities() -> String {
    flags_table(
        "Capabilities",
        names32::<Capabilities>(),
        &[
            ("CONN_TABLE", "INSERT, UPDATE, UPSERT, DELETE, LOOKUP, FLUSH"),
            ("IPV6", "keys with family 6"),
            ("NAT", "NAT translations in chained EXT descriptors"),
            ("AGING", "aging scanner (AGING_PERIOD_MS) and AGED events"),
            ("SNAPSHOT", "SNAPSHOT command"),
            ("EVENTS", "event ring (EVT_* registers)"),
            ("MSIX", "MSI-X interrupts with moderation (IRQ_COALESCE_*)"),
            ("COST_MODEL", "`model_cycles` counter is maintained"),
            ("INLINE_DOORBELL", "`CMD_INLINE` window: a doorbell carrying the first descriptor"),
            ("SYNC", "Delta Sync unit: CONTROL.SYNC_HOLD, the sync counters, REPLICA, SYNC_RECORDS, consistent walks"),
            ("LOAD", "LOAD command: a buffer of sync records applied as REPLICA writes (ABI 1.6)"),
            ("SYNC_ALIGN", "SYNC_POSITIONS and SYNC_ALIGN: a Full Sync's cut in each peer's stream (ABI 1.8)"),
            ("TABLE_HASH_SEED", "the table hash is the ABI's, seeded by TABLE_HASH_SEED_0..3 (ABI 1.9, section 5.1)"),
        ],
    )
}

fn render_control() -> String {
    flags_table(
        "Control",
        names32::<Control>(),
        &[
            ("ENABLE", "0→1: validate ring registers and start fetching; 1→0: stop fetching"),
            ("RESET", "reset rings, table, counters and registers; self-clearing (CONTROL reads 0 when done)"),
            ("IRQ_ENABLE", "allow interrupt messages (IRQ_STATUS is updated regardless)"),
            (
                "SYNC_HOLD",
                "buffer received peer updates (up to SYNC_HOLD_CAPACITY) instead of applying them; clearing it \
                 applies them in arrival order (set by a host for the length of a Full Sync)",
            ),
        ],
    )
}

fn render_status() -> String {
    flags_table(
        "Status",
        names32::<Status>(),
        &[
            ("READY", "out of reset, registers may be programmed"),
            ("ENABLED", "ENABLE accepted, fetching commands"),
            ("FATAL", "stopped by a ring configuration or ring DMA error; only RESET clears it"),
            ("EVENT_OVERFLOW", "an event was dropped since reset (sticky until RESET)"),
        ],
    )
}

fn render_irq() -> String {
    flags_table(
        "IrqCause",
        names32::<IrqCause>(),
        &[
            ("COMPLETION", "completions written (moderated; vector 0)"),
            ("EVENT", "an event was written (vector 1)"),
            ("ERROR", "the device became FATAL (vector 1)"),
        ],
    )
}

fn render_desc_flags() -> String {
    flags_table(
        "DescFlags",
        names8::<DescFlags>(),
        &[
            ("CHAIN", "the command continues in the next slot, which holds an EXT descriptor"),
            ("AUTO_GENERATION", "the device assigns the generation (stored + 1, or 1 when new); the body's is ignored"),
            ("IRQ_NOW", "raise the completion interrupt at the end of this batch, ignoring coalescing"),
            (
                "REPLICA",
                "UPSERT of another member's entry (Full Sync): needs CHAIN with an EXT naming the owner; applied \
                 under the conflict rule (STALE if it loses), not sent to the peers, no event; not with AUTO_GENERATION",
            ),
            (
                "SYNC_RECORDS",
                "SNAPSHOT writes 88-byte sync records (`DeltaRecord`, op UPSERT, with the owner) of the entries \
                 marked SYNC instead of 80-byte `ConnRecord`s of every entry",
            ),
        ],
    )
}

fn render_conn_flags() -> String {
    flags_table(
        "ConnFlags",
        names16::<ConnFlags>(),
        &[
            ("SEEN_REPLY", "traffic seen in both directions"),
            ("ASSURED", "assured: not dropped early under pressure"),
            ("CONFIRMED", "committed to the table"),
            ("SRC_NAT", "source NAT applies"),
            ("DST_NAT", "destination NAT applies"),
            ("SYNC", "changes are synchronised to the cluster"),
            ("OFFLOAD", "forwarded by the hardware data path"),
            ("DYING", "being torn down"),
        ],
    )
}

// ---------------------------------------------------------------------------
// Enumerations (probed over every byte value)
// ---------------------------------------------------------------------------

fn upper_snake(debug: &str) -> String {
    let mut out = String::new();
    for (i, ch) in debug.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(ch.to_ascii_uppercase());
    }
    out
}

fn enum_table<T: Copy>(
    from_wire: impl Fn(u8) -> Option<T>,
    name: impl Fn(T) -> String,
    meaning: impl Fn(T) -> &'static str,
) -> String {
    let mut rows = Vec::new();
    let mut values = Vec::new();
    for b in 0..=u8::MAX {
        if let Some(v) = from_wire(b) {
            values.push(b);
            rows.push(vec![b.to_string(), format!("`{}`", name(v)), meaning(v).to_string()]);
        }
    }
    let mut out = table(&["Value", "Name", "Meaning"], &rows);
    let list: Vec<String> = values.iter().map(u8::to_string).collect();
    let _ = writeln!(out, "\nValid values: {}; every other value is rejected.", list.join(", "));
    out
}

fn render_tcp_state() -> String {
    enum_table(
        TcpState::from_wire,
        |s| s.name().to_ascii_uppercase(),
        |s| match s {
            TcpState::None => "no TCP state (non-TCP protocols)",
            TcpState::SynSent => "SYN sent",
            TcpState::SynRecv => "SYN received",
            TcpState::Established => "established",
            TcpState::FinWait => "FIN wait",
            TcpState::CloseWait => "close wait",
            TcpState::LastAck => "last ACK",
            TcpState::TimeWait => "time wait",
            TcpState::Close => "closed",
            TcpState::SynSent2 => "simultaneous open",
        },
    )
}

fn render_direction() -> String {
    enum_table(
        Direction::from_wire,
        |d| upper_snake(&format!("{d:?}")),
        |d| match d {
            Direction::Original => "last change came from the original direction",
            Direction::Reply => "last change came from the reply direction",
        },
    )
}

fn render_nat_kind() -> String {
    enum_table(
        NatKind::from_wire,
        |k| upper_snake(&format!("{k:?}")),
        |k| match k {
            NatKind::None => "no translation; the other fields are ignored (written as zero)",
            NatKind::Source => "source address/port rewritten to the translation",
            NatKind::Destination => "destination address/port rewritten to the translation",
        },
    )
}

fn render_event_kind() -> String {
    enum_table(
        EventKind::from_wire,
        |k| upper_snake(&format!("{k:?}")),
        |k| {
            match k {
            EventKind::Aged => "aging removed an expired connection; key and last state attached",
            EventKind::Overflow => "events were dropped; `state.generation` holds how many",
            EventKind::SyncUpdated => "a peer's change was applied (key, new state)",
            EventKind::SyncRemoved => {
                "a peer's deletion was applied (key, last state), or came for a key the card does not hold (key, the delete's generation)"
            }
            EventKind::ResyncNeeded => "a peer's updates were lost: `state.mark` = peer, `state.generation` = how many",
        }
        },
    )
}

// ---------------------------------------------------------------------------
// Opcodes and status codes
// ---------------------------------------------------------------------------

struct OpDoc {
    body: &'static str,
    result: &'static str,
    statuses: &'static [CplStatus],
}

fn opcode_doc(op: Opcode) -> OpDoc {
    use CplStatus::*;
    match op {
        Opcode::Nop => OpDoc { body: "zero", result: "0", statuses: &[Success, Malformed] },
        Opcode::Insert => OpDoc {
            body: "`ConnBody` (+ EXT)",
            result: "generation stored",
            statuses: &[Success, Exists, TableFull, Malformed],
        },
        Opcode::Update => OpDoc {
            body: "`ConnBody` (+ EXT)",
            result: "generation stored (STALE: the stored, newer generation)",
            statuses: &[Success, NotFound, Stale, Malformed],
        },
        Opcode::Delete => OpDoc {
            body: "`ConnBody` (state ignored, but for a REPLICA's generation)",
            result: "generation of the delete (one above the entry's, raised to GENERATION_FLOOR; ABI 1.5, 0 before; REPLICA: the owner's, ABI 1.6; STALE: the winner's)",
            statuses: &[Success, NotFound, Stale, Malformed],
        },
        Opcode::Lookup => OpDoc {
            body: "`LookupBody`",
            result: "1 (records written)",
            statuses: &[Success, NotFound, DmaError, Malformed],
        },
        Opcode::Snapshot => OpDoc {
            body: "`SnapshotBody`",
            result: "records written | next cursor << 32",
            statuses: &[Success, DmaError, SnapshotTorn, Malformed],
        },
        Opcode::Flush => OpDoc { body: "zero", result: "entries removed", statuses: &[Success, Malformed] },
        Opcode::Upsert => OpDoc {
            body: "`ConnBody` (+ EXT)",
            result: "generation stored (STALE: the stored, newer generation)",
            statuses: &[Success, Stale, TableFull, Malformed],
        },
        Opcode::Load => OpDoc {
            body: "`LoadBody`",
            result: "records that took (their statuses SUCCESS)",
            statuses: &[Success, DmaError, Malformed],
        },
        Opcode::SyncPositions => OpDoc {
            body: "`PositionsBody`",
            result: "entries written",
            statuses: &[Success, DmaError, Malformed],
        },
        Opcode::SyncAlign => OpDoc {
            body: "`PositionsBody`",
            result: "entries that aligned a receiver",
            statuses: &[Success, DmaError, Malformed],
        },
        Opcode::Ext => {
            OpDoc { body: "`ExtBody`", result: "— (never succeeds alone)", statuses: &[InvalidOpcode, Malformed] }
        }
    }
}

fn test_key() -> ConnKey {
    ConnKey::v4([10, 0, 0, 1].into(), 1234, [192, 0, 2, 1].into(), 443, 6, 0)
}

/// A descriptor for `op` that decodes successfully with no flags (EXT:
/// a bare EXT descriptor, which never does).
fn valid_descriptor(op: Opcode) -> CommandDescriptor {
    let key = test_key();
    match op {
        Opcode::Nop | Opcode::Flush => CommandDescriptor::header(op, DescFlags::empty(), 7),
        Opcode::Insert | Opcode::Update | Opcode::Upsert | Opcode::Delete => {
            CommandDescriptor::conn(op, DescFlags::empty(), 7, &key, &ConnState::default())
        }
        Opcode::Lookup => CommandDescriptor::lookup(7, &key, 0x1000),
        Opcode::Snapshot => CommandDescriptor::snapshot(7, 0x1000, nicsync_fwif::sync::RECORD_SIZE as u32, 0),
        Opcode::Load => CommandDescriptor::load(7, 0x1000, 0x2000, 1),
        Opcode::SyncPositions => CommandDescriptor::positions(7, false, 0x1000, MAX_POSITIONS),
        Opcode::SyncAlign => CommandDescriptor::positions(7, true, 0x1000, 1),
        Opcode::Ext => CommandDescriptor::ext(7, &Nat::default()),
    }
}

/// The descriptor flags `op` accepts, found by decoding.
fn accepted_flags(op: Opcode) -> Vec<&'static str> {
    let ext = CommandDescriptor::ext(7, &Nat::default());
    let base = valid_descriptor(op);
    if op == Opcode::Ext {
        assert_eq!(base.decode(None), Err(DecodeError::UnknownOpcode(Opcode::Ext as u8)));
        return Vec::new();
    }
    assert!(base.decode(None).is_ok(), "{op:?}: minimal descriptor does not decode");
    let mut out = Vec::new();
    for (name, f) in DescFlags::all().iter_names() {
        let mut d = base;
        d.flags = f.bits();
        match d.decode(Some(&ext)) {
            Err(DecodeError::BadFlags(_)) => {}
            // REPLICA is accepted but needs an EXT naming the owner.
            Ok(_) | Err(DecodeError::BadOwner) => out.push(name),
            Err(e) => panic!("{op:?} with {name}: unexpected {e:?}"),
        }
    }
    // A flag that needs another: REPLICA names its owner in the EXT, so a
    // DELETE (which takes no EXT of its own) carries it with CHAIN.
    if out.contains(&"REPLICA") && !out.contains(&"CHAIN") {
        let mut d = base;
        d.flags = (DescFlags::REPLICA | DescFlags::CHAIN).bits();
        // (The EXT here names no owner: BadOwner is the flags accepted.)
        if matches!(d.decode(Some(&ext)), Ok(_) | Err(DecodeError::BadOwner)) {
            for name in out.iter_mut().filter(|n| **n == "REPLICA") {
                *name = "REPLICA (with CHAIN: the EXT names the owner)";
            }
        }
    }
    for bit in 0..8u8 {
        if DescFlags::from_bits(1 << bit).is_none() {
            let mut d = base;
            d.flags = 1 << bit;
            assert_eq!(d.decode(Some(&ext)), Err(DecodeError::BadFlags(1 << bit)), "{op:?} accepts undefined flag");
        }
    }
    out
}

fn render_opcodes() -> String {
    let rows: Vec<Vec<String>> = Opcode::ALL
        .iter()
        .map(|op| {
            let d = opcode_doc(*op);
            let flags = accepted_flags(*op);
            let flags = if flags.is_empty() { "—".to_string() } else { flags.join(", ") };
            let st: Vec<&str> = d.statuses.iter().map(|s| s.name()).collect();
            vec![
                format!("0x{:02X}", *op as u8),
                format!("`{}`", op.name()),
                d.body.to_string(),
                flags,
                d.result.to_string(),
                st.join(", "),
            ]
        })
        .collect();
    table(&["Value", "Name", "Body", "Flags accepted", "Result on SUCCESS", "Statuses"], &rows)
}

fn status_meaning(s: CplStatus) -> &'static str {
    match s {
        CplStatus::Success => "the command was carried out",
        CplStatus::NotFound => "no connection with this key",
        CplStatus::Exists => "INSERT of a key that is present; the table is unchanged",
        CplStatus::TableFull => "no room: capacity reached, or no cuckoo path and the stash is full",
        CplStatus::InvalidOpcode => "opcode byte undefined, or an EXT not consumed by a chain",
        CplStatus::Malformed => "flags, aux, reserved bytes, key, state or EXT chain invalid",
        CplStatus::DmaError => "a response buffer lies outside every IOMMU window; nothing was written",
        CplStatus::Stale => "the body's generation is older than the stored one; the table is unchanged",
        CplStatus::Internal => "device-internal fault (a design bug); the host should reset the device",
        CplStatus::SnapshotTorn => {
            "SNAPSHOT: the walk can no longer be consistent (more entries moved behind it than its carry FIFO \
             holds, or the cursor does not continue the device's walk); start again at cursor 0"
        }
    }
}

fn render_statuses() -> String {
    let rows: Vec<Vec<String>> = CplStatus::ALL
        .iter()
        .map(|s| {
            let by: Vec<&str> =
                Opcode::ALL.iter().filter(|op| opcode_doc(**op).statuses.contains(s)).map(|op| op.name()).collect();
            let mut by = if by.is_empty() { "any (not expected)".to_string() } else { by.join(", ") };
            if *s == CplStatus::InvalidOpcode {
                by.push_str(", undefined opcode bytes");
            }
            vec![(*s as u8).to_string(), format!("`{}`", s.name()), status_meaning(*s).to_string(), by]
        })
        .collect();
    table(&["Value", "Name", "Meaning", "Returned by"], &rows)
}

// ---------------------------------------------------------------------------
// Wire struct layouts
// ---------------------------------------------------------------------------

struct Field {
    name: &'static str,
    offset: usize,
    size: usize,
    ty: String,
    meaning: &'static str,
}

struct Layout {
    name: &'static str,
    size: usize,
    align: usize,
    fields: Vec<Field>,
}

/// "zerocopy::byteorder::U16<zerocopy::byteorder::LittleEndian>" → "u16 LE",
/// "nicsync_fwif::conn::ConnKey" → "ConnKey", "[u8; 16]" → "u8[16]".
fn short_type(full: &str) -> String {
    if let Some(inner) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        let (elem, n) = inner.split_once("; ").unwrap_or_else(|| panic!("array type {full}"));
        return format!("{}[{n}]", short_type(elem));
    }
    let (path, generic) = match full.split_once('<') {
        Some((p, g)) => (p, Some(g)),
        None => (full, None),
    };
    let last = path.rsplit("::").next().unwrap_or(path);
    match (last, generic) {
        ("U16" | "U32" | "U64", Some(g)) => {
            assert!(g.contains("LittleEndian") || g.ends_with("LE>"), "{full}: wire integers are little-endian");
            format!("{} LE", last.to_ascii_lowercase())
        }
        (_, Some(_)) => panic!("unexpected generic wire type {full}"),
        (l, None) => l.to_string(),
    }
}

macro_rules! layout {
    ($ty:ident { $( $field:ident : $meaning:expr ),* $(,)? }) => {{
        let v: $ty = FromZeros::new_zeroed();
        // Fails to compile if the struct gains or loses a field.
        let $ty { $( $field: _ ),* } = v;
        Layout {
            name: stringify!($ty),
            size: ::core::mem::size_of::<$ty>(),
            align: ::core::mem::align_of::<$ty>(),
            fields: vec![$(
                Field {
                    name: stringify!($field),
                    offset: ::core::mem::offset_of!($ty, $field),
                    size: ::core::mem::size_of_val(&v.$field),
                    ty: short_type(::std::any::type_name_of_val(&v.$field)),
                    meaning: $meaning,
                },
            )*],
        }
    }};
}

fn render_layout(l: &Layout) -> String {
    assert_eq!(l.align, 1, "{}: wire structs have alignment 1", l.name);
    let mut at = 0;
    for f in &l.fields {
        assert_eq!(f.offset, at, "{}.{}: fields must be listed in order, with no gap", l.name, f.name);
        at += f.size;
    }
    assert_eq!(at, l.size, "{}: fields do not cover the struct", l.name);
    let rows: Vec<Vec<String>> = l
        .fields
        .iter()
        .map(|f| {
            vec![f.offset.to_string(), f.size.to_string(), format!("`{}`", f.name), f.ty.clone(), f.meaning.into()]
        })
        .collect();
    let mut out = format!("`{}`: {} bytes, alignment 1.\n\n", l.name, l.size);
    out.push_str(&table(&["Offset", "Size", "Field", "Type", "Meaning"], &rows));
    out
}

/// Bit positions of the fields in the first 8 bytes of a ring entry, which
/// the device writes last, as one little-endian 64-bit word.
fn render_word0(l: &Layout) -> String {
    let mut rows = Vec::new();
    let mut phase_bit = None;
    for f in l.fields.iter().filter(|f| f.offset < 8) {
        assert!(f.offset + f.size <= 8, "{}.{} straddles the ownership word", l.name, f.name);
        let (lo, hi) = (f.offset * 8, (f.offset + f.size) * 8 - 1);
        if f.name == "phase" {
            phase_bit = Some(lo + PHASE_BIT.trailing_zeros() as usize);
        }
        rows.push(vec![format!("{hi}:{lo}"), format!("`{}`", f.name)]);
    }
    rows.reverse();
    let phase_bit = phase_bit.unwrap_or_else(|| panic!("{} has no phase byte in word 0", l.name));
    let mut out = table(&["Bits of word 0", "Field"], &rows);
    let _ = writeln!(out, "\nThe phase bit is bit {phase_bit} of word 0 (`{}` bytes 0..8).", l.name);
    out
}

fn layouts() -> Vec<(&'static str, Layout)> {
    vec![
        (
            "layout-command-descriptor",
            layout!(CommandDescriptor {
                opcode: "opcode (see opcode table)",
                flags: "DescFlags; bits an opcode does not accept make it MALFORMED",
                tag: "host-chosen, echoed in the completion",
                aux: "reserved, must be 0",
                body: "opcode-specific body (ConnBody, LookupBody, SnapshotBody, ExtBody; zero for NOP/FLUSH)",
            }),
        ),
        (
            "layout-conn-body",
            layout!(ConnBody {
                key: "connection key (original direction)",
                state: "new state (DELETE: ignored, not checked)",
            }),
        ),
        (
            "layout-lookup-body",
            layout!(LookupBody {
                key: "connection key",
                resp_addr: "IOVA of an 80-byte buffer for the ConnRecord (any alignment)",
                reserved: "must be 0",
            }),
        ),
        (
            "layout-snapshot-body",
            layout!(SnapshotBody {
                buf_addr: "IOVA of the record buffer; the whole buffer must lie in one IOMMU window",
                buf_len: "buffer length in bytes, >= one record (80; 88 with SYNC_RECORDS); floor(buf_len / record) records fit",
                cursor: "slot position to start from: 0 for the first chunk, then the previous next cursor",
                reserved: "must be 0",
            }),
        ),
        (
            "layout-load-body",
            layout!(LoadBody {
                buf_addr: "IOVA of `count` packed 88-byte sync records; all of them in one IOMMU window",
                status_addr: "IOVA of `count` 8-byte LoadStatus entries; all of them in one IOMMU window",
                count: "records to apply, 1 to LOAD_MAX_RECORDS",
                reserved: "must be 0",
            }),
        ),
        (
            "layout-load-status",
            layout!(LoadStatus {
                status: "CplStatus of the record: SUCCESS, STALE, TABLE_FULL or MALFORMED",
                reserved: "0",
                result: "SUCCESS: the generation stored (UPSERT) or of the tombstone (DELETE); STALE: that of the version that won; otherwise 0",
            }),
        ),
        (
            "layout-positions-body",
            layout!(PositionsBody {
                buf_addr: "IOVA of the 16-byte SyncPosition entries; all of them in one IOMMU window",
                entries: "SYNC_POSITIONS: room for this many; SYNC_ALIGN: entries to read; 1 to MAX_POSITIONS (65)",
                reserved: "must be 0",
            }),
        ),
        (
            "layout-sync-position",
            layout!(SyncPosition {
                member: "member whose Delta Sync stream this is (non-zero)",
                reserved: "must be 0",
                epoch: "that member's epoch (non-zero)",
                next_seq: "the stream's next number: everything before it is in the table (non-zero)",
            }),
        ),
        (
            "layout-ext-body",
            layout!(ExtBody {
                nat: "NAT translation of the chained command",
                owner: "owner member id of a REPLICA write (non-zero); 0 otherwise",
                reserved: "must be 0"
            }),
        ),
        (
            "layout-completion",
            layout!(CompletionEntry {
                tag: "tag of the completed command (the first descriptor of a chain)",
                status: "CplStatus",
                opcode: "opcode byte of the completed command as fetched",
                cmd_head: "command ring head after this command: slots before it may be reused",
                reserved: "0",
                phase: "bit 0: phase; bits 7:1 zero. Last byte of the ownership word",
                result: "opcode-specific result (opcode table); 0 on errors except STALE",
            }),
        ),
        (
            "layout-event",
            layout!(EventEntry {
                seq: "sequence number; every event, dropped ones included, takes the next one (first is 1)",
                kind: "EventKind",
                reserved: "0",
                phase: "bit 0: phase; bits 7:1 zero",
                key: "AGED: the connection's key; OVERFLOW: zero",
                state: "AGED: its state as last written; OVERFLOW: zero except `generation` = events lost",
            }),
        ),
        (
            "layout-conn-key",
            layout!(ConnKey {
                src_addr: "source address, original direction (IPv4: bytes 0..4, bytes 4..16 zero)",
                dst_addr: "destination address, original direction (IPv4 as above)",
                src_port: "source port (0 for port-less protocols)",
                dst_port: "destination port (ICMP: identifier)",
                proto: "IANA protocol number (any value)",
                family: "4 (IPv4) or 6 (IPv6)",
                zone: "conntrack zone",
            }),
        ),
        (
            "layout-conn-state",
            layout!(ConnState {
                tcp_state: "TcpState",
                direction: "Direction",
                flags: "ConnFlags",
                timeout_s:
                    "commands: seconds from now until expiry; records: seconds remaining (rounded up); 0 = never ages",
                mark: "firewall mark (opaque to the device)",
                generation: "per-connection generation (STALE rule)",
            }),
        ),
        (
            "layout-nat",
            layout!(Nat {
                addr: "translated address (IPv4: bytes 0..4, rest zero)",
                port: "translated port",
                kind: "NatKind",
                family: "family of `addr`, equal to the key's; 0 when kind is NONE",
                reserved: "must be 0",
            }),
        ),
        (
            "layout-conn-record",
            layout!(ConnRecord {
                key: "the key",
                state: "the state; `timeout_s` = seconds remaining",
                nat: "the translation (all zero when there is none)",
            }),
        ),
    ]
}

// ---------------------------------------------------------------------------
// The document
// ---------------------------------------------------------------------------

fn sections() -> Vec<(&'static str, String)> {
    let mut s = vec![
        ("constants", render_constants()),
        ("registers", render_registers()),
        ("counters", render_counters()),
        ("flags-capabilities", render_capabilities()),
        ("flags-control", render_control()),
        ("flags-status", render_status()),
        ("flags-irq", render_irq()),
        ("flags-desc", render_desc_flags()),
        ("flags-conn", render_conn_flags()),
        ("enum-tcp-state", render_tcp_state()),
        ("enum-direction", render_direction()),
        ("enum-nat-kind", render_nat_kind()),
        ("enum-event-kind", render_event_kind()),
        ("opcodes", render_opcodes()),
        ("statuses", render_statuses()),
    ];
    for (name, l) in layouts() {
        s.push((name, render_layout(&l)));
        match name {
            "layout-completion" => s.push(("word0-completion", render_word0(&l))),
            "layout-event" => s.push(("word0-event", render_word0(&l))),
            _ => {}
        }
    }
    s
}

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("docs").join("abi.md")
}

fn begin(name: &str) -> String {
    format!("<!-- BEGIN GENERATED: {name} -->\n")
}

fn end(name: &str) -> String {
    format!("<!-- END GENERATED: {name} -->")
}

/// Byte range of the generated text of section `name` in `doc`.
fn span(doc: &str, name: &str) -> Result<std::ops::Range<usize>, String> {
    let (b, e) = (begin(name), end(name));
    let count = |m: &str| doc.matches(m).count();
    if count(&b) != 1 || count(&e) != 1 {
        return Err(format!(
            "docs/abi.md must contain exactly one `{}` and one `{e}` (found {} and {})",
            b.trim_end(),
            count(&b),
            count(&e)
        ));
    }
    let start = doc.find(&b).map(|i| i + b.len()).unwrap_or_default();
    let stop = doc.find(&e).unwrap_or_default();
    if stop < start {
        return Err(format!("docs/abi.md: `{e}` comes before its BEGIN marker"));
    }
    Ok(start..stop)
}

fn first_difference(doc: &str, code: &str) -> String {
    let (mut d, mut c) = (doc.lines(), code.lines());
    for n in 1.. {
        match (d.next(), c.next()) {
            (None, None) => break,
            (a, b) if a == b => continue,
            (a, b) => {
                return format!(
                    "line {n}: document has {:?}, code renders {:?}",
                    a.unwrap_or("<end>"),
                    b.unwrap_or("<end>")
                )
            }
        }
    }
    "whitespace differs".into()
}

#[test]
fn abi_doc_matches_code() {
    let path = doc_path();
    let mut doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let sections = sections();

    // No stale sections in the document.
    for line in doc.lines() {
        if let Some(name) = line.strip_prefix("<!-- BEGIN GENERATED: ").and_then(|s| s.strip_suffix(" -->")) {
            assert!(
                sections.iter().any(|(n, _)| *n == name),
                "docs/abi.md has a generated section `{name}` that tests/abi_doc.rs does not render"
            );
        }
    }

    if std::env::var_os("NICSYNC_BLESS").is_some_and(|v| v == "1") {
        let before = doc.clone();
        for (name, text) in &sections {
            let r = span(&doc, name).unwrap_or_else(|e| panic!("{e}"));
            doc.replace_range(r, text);
        }
        if doc != before {
            std::fs::write(&path, &doc).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            eprintln!("rewrote the generated sections of {}", path.display());
        }
        return;
    }

    let mut problems = Vec::new();
    for (name, text) in &sections {
        match span(&doc, name) {
            Err(e) => problems.push(e),
            Ok(r) => {
                let current = &doc[r];
                if current != text {
                    problems.push(format!("section `{name}` is out of date: {}", first_difference(current, text)));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/abi.md does not match nicsync-fwif:\n  {}\n\nRegenerate the tables with\n    \
         NICSYNC_BLESS=1 cargo test -p nicsync-fwif --test abi_doc\nthen review the diff (and the prose around \
         the tables).",
        problems.join("\n  ")
    );
    for (name, text) in &sections {
        assert!(doc.contains(text.as_str()), "section `{name}` is not in docs/abi.md verbatim");
    }
}

// ---------------------------------------------------------------------------
// Cross-checks of the lists the tables are rendered from
// ---------------------------------------------------------------------------

#[test]
fn lists_are_complete() {
    let probed: Vec<Opcode> = (0..=u8::MAX).filter_map(Opcode::from_wire).collect();
    assert_eq!(probed, Opcode::ALL.to_vec(), "Opcode::ALL differs from Opcode::from_wire");
    for op in Opcode::ALL {
        assert_eq!(Opcode::from_wire(op as u8), Some(op));
    }
    let probed: Vec<CplStatus> = (0..=u8::MAX).filter_map(CplStatus::from_wire).collect();
    assert_eq!(probed, CplStatus::ALL.to_vec(), "CplStatus::ALL differs from CplStatus::from_wire");
    let probed: Vec<TcpState> = (0..=u8::MAX).filter_map(TcpState::from_wire).collect();
    assert_eq!(probed, TcpState::ALL.to_vec());

    let mut names: Vec<&str> = Counter::ALL.iter().map(|c| c.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), Counter::ALL.len(), "counter names are not unique");
    for (i, c) in Counter::ALL.iter().enumerate() {
        assert_eq!(c.offset(), regs::COUNTER_BASE + 8 * i as u32);
    }

    // Registers: 4-byte aligned, unique, below the counters.
    for w in regs::REGISTERS.windows(2) {
        assert!(w[0].offset < w[1].offset, "REGISTERS not in offset order at {}", w[1].name);
    }
    for r in regs::REGISTERS {
        assert_eq!(r.offset % 4, 0, "{} is not 4-byte aligned", r.name);
        assert!(["RO", "RW", "WO", "W1C"].contains(&r.access), "{}: access {}", r.name, r.access);
    }
}

#[test]
fn ownership_word_holds_the_phase_bit() {
    // The device's last write to an entry is its first 8-byte word; the
    // phase byte must lie in it for the protocol in docs/abi.md to hold.
    assert!(core::mem::offset_of!(CompletionEntry, phase) < 8);
    assert!(core::mem::offset_of!(EventEntry, phase) < 8);
    assert_eq!(CPL_SIZE % 8, 0);
    assert_eq!(EVT_SIZE % 8, 0);
    assert_eq!(DESC_SIZE % 64, 0);
}
