//! Writes the seed corpora under `fuzz/corpus/<target>/` from valid
//! encodings made by the project's own encoders, in each harness's input
//! format (see the `nicsync_fuzz` modules), then runs every seed through its
//! harness once.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus
//! ```
//!
//! It replaces the contents of `fuzz/corpus/`; regenerate after a wire
//! format changes (the fuzzer still works with stale seeds, only slower).

use std::fs;
use std::path::{Path, PathBuf};

use nicsync::fullsync::{self, Message as FsMessage};
use nicsync::membership::{self, Entry, MemberState, MessageKind, Mode};
use nicsync_fuzz::{ccp, cmd_descriptor as cd, delta_frame as df, fullsync_chunk as fs_, key, nat_for, state};
use nicsync_fwif::cmd::{CommandDescriptor, ConnOp, DescFlags, Opcode};
use nicsync_fwif::conn::Nat;
use nicsync_fwif::sync::{AckEntry, DeltaUpdate, DeltaWriter, Frame, Origin, SeqRange, MAX_FRAME};
use zerocopy::IntoBytes;

type Seeds = Vec<(&'static str, Vec<u8>)>;

// ---------------------------------------------------------------- delta_frame

fn frame(f: impl FnOnce(&mut [u8]) -> usize) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = f(&mut buf);
    buf.truncate(n);
    buf
}

const TX: Origin = Origin { cluster_id: df::CLUSTER, member_id: df::SENDER, epoch: df::SENDER_EPOCH };
const RX: Origin = Origin { cluster_id: df::CLUSTER, member_id: df::RECEIVER, epoch: df::RECEIVER_EPOCH };

fn update(i: u8) -> DeltaUpdate {
    let k = key(i);
    if i % 5 == 4 {
        DeltaUpdate::delete(df::SENDER, k, state(0, i.into()))
    } else {
        DeltaUpdate::upsert(df::SENDER, k, state(i.into(), 1), if i % 2 == 0 { nat_for(&k) } else { Nat::default() })
    }
}

fn hello(first: u64, next: u64) -> Vec<u8> {
    frame(|b| Frame::encode_hello(b, &TX, first, next).expect("hello"))
}

fn delta(first: u64, n: u8, retransmit: bool) -> Vec<u8> {
    frame(|b| {
        let mut w = DeltaWriter::new(b, TX, first, retransmit).expect("writer");
        for i in 0..n {
            w.push(&update(i)).expect("push");
        }
        w.finish().expect("finish")
    })
}

struct Ops(Vec<u8>);

impl Ops {
    fn new(flags: u8) -> Self {
        Ops(vec![flags])
    }
    fn dgram(mut self, f: &[u8]) -> Self {
        self.0.push(0);
        self.0.extend_from_slice(&(f.len() as u16).to_le_bytes());
        self.0.extend_from_slice(f);
        self
    }
    fn time(mut self, us: u16) -> Self {
        self.0.push(1);
        self.0.extend_from_slice(&us.to_le_bytes());
        self
    }
    fn submit(mut self, u: &DeltaUpdate) -> Self {
        self.0.push(2);
        self.0.extend_from_slice(u.to_record().as_bytes());
        self
    }
    fn deliver(mut self, mask: u8) -> Self {
        self.0.extend_from_slice(&[3, mask]);
        self
    }
    fn start_at(mut self, epoch: u32, seq: u64) -> Self {
        self.0.push(4);
        self.0.extend_from_slice(&epoch.to_le_bytes());
        self.0.extend_from_slice(&seq.to_le_bytes());
        self
    }
}

fn delta_frame() -> Seeds {
    let nack = frame(|b| {
        let r = [SeqRange { target: df::SENDER, target_epoch: df::SENDER_EPOCH, from: 1, to: 3 }];
        Frame::encode_nack(b, &RX, &r).expect("nack")
    });
    let hello_req = frame(|b| Frame::encode_nack(b, &RX, &[SeqRange::hello_request(df::SENDER)]).expect("nack"));
    let ack = frame(|b| {
        Frame::encode_ack(b, &RX, &[AckEntry { target: df::SENDER, target_epoch: df::SENDER_EPOCH, through: 2 }])
            .expect("ack")
    });
    let lost = frame(|b| {
        let r = [SeqRange { target: df::RECEIVER, target_epoch: df::SENDER_EPOCH, from: 4, to: 6 }];
        Frame::encode_lost(b, &TX, &r).expect("lost")
    });
    let alive = frame(|b| Frame::encode_alive(b, &TX, 12).expect("alive"));
    let mut bad_crc = delta(1, 2, false);
    bad_crc[40] ^= 0x10;
    vec![
        ("in-order", Ops::new(0).dgram(&hello(1, 1)).dgram(&delta(1, 3, false)).deliver(3).0),
        (
            "gap-nack",
            Ops::new(0)
                .dgram(&hello(1, 1))
                .dgram(&delta(4, 2, false))
                .time(500)
                .deliver(2)
                .time(5000)
                .deliver(2)
                .dgram(&delta(1, 3, true))
                .0,
        ),
        ("alive-lost", Ops::new(0).dgram(&hello(1, 1)).dgram(&alive).time(300).dgram(&lost).deliver(3).0),
        (
            "loopback",
            Ops::new(0)
                .submit(&update(0))
                .submit(&update(1))
                .submit(&update(4))
                .time(100)
                .deliver(7)
                .time(2000)
                .deliver(3)
                .time(30000)
                .deliver(3)
                .0,
        ),
        (
            "sender-nack-ack",
            Ops::new(0)
                .submit(&update(0))
                .submit(&update(2))
                .deliver(4)
                .dgram(&nack)
                .dgram(&ack)
                .dgram(&hello_req)
                .deliver(3)
                .0,
        ),
        ("restart", Ops::new(0).dgram(&hello(1, 5)).dgram(&delta(5, 1, false)).start_at(df::SENDER_EPOCH, 9).0),
        ("fix-crc", Ops::new(1).dgram(&hello(1, 1)).dgram(&bad_crc).deliver(3).0),
        ("frame-delta", delta(7, 4, false)),
        ("frame-nack", nack),
        ("frame-ack", ack),
        ("frame-lost", lost),
        ("frame-hello", hello(3, 9)),
        ("frame-alive", alive),
    ]
}

// ------------------------------------------------------------- cmd_descriptor

fn descs(flags: u8, seconds: u8, ds: &[CommandDescriptor]) -> Vec<u8> {
    let mut v = vec![flags, seconds];
    for d in ds {
        v.extend_from_slice(d.as_bytes());
    }
    v
}

fn conn(op: Opcode, i: u8, nat: bool, timeout_s: u32) -> Vec<CommandDescriptor> {
    let k = key(i);
    let mut st = state(i.into(), 0);
    st.timeout_s = timeout_s.into();
    let o = ConnOp { key: k, state: st, nat: nat.then(|| nat_for(&k)), auto_generation: true, replica_owner: None };
    let (d, e) = o.encode(op, i.into());
    std::iter::once(d).chain(e).collect()
}

fn cmd_descriptor() -> Seeds {
    let mut bad_op = CommandDescriptor::zeroed();
    bad_op.opcode = 0x42;
    let mut chain_no_ext = conn(Opcode::Insert, 3, false, 0)[0];
    chain_no_ext.flags |= DescFlags::CHAIN.bits();
    let mut reserved = CommandDescriptor::lookup(7, &key(1), cd::DATA_IOVA);
    reserved.body[50] = 1;
    let replica = ConnOp { key: key(6), state: state(1, 5), nat: None, auto_generation: false, replica_owner: Some(3) };
    let (rd, re) = replica.encode(Opcode::Upsert, 20);
    let (dd, de) = CommandDescriptor::replica_delete(22, &key(8), 9, 4);
    let nop = CommandDescriptor::header(Opcode::Nop, DescFlags::IRQ_NOW, 1);
    let flush = CommandDescriptor::header(Opcode::Flush, DescFlags::empty(), 2);
    let del = CommandDescriptor::conn(Opcode::Delete, DescFlags::empty(), 5, &key(0), &state(0, 0));
    let mut v = Vec::new();
    let mut basic = conn(Opcode::Insert, 0, false, 0);
    basic.push(CommandDescriptor::lookup(1, &key(0), cd::DATA_IOVA));
    basic.push(CommandDescriptor::snapshot(2, cd::DATA_IOVA, 800, 0));
    basic.push(del);
    v.push(("insert-lookup-snapshot-delete", descs(0, 0, &basic)));
    let mut nat = conn(Opcode::Insert, 1, true, 0);
    nat.extend(conn(Opcode::Upsert, 1, true, 0));
    nat.extend(conn(Opcode::Update, 2, false, 0));
    nat.push(CommandDescriptor::lookup(9, &key(1), cd::DATA_IOVA + 128));
    nat.push(flush);
    v.push(("nat-chain-inline", descs(3, 0, &nat)));
    let mut aging = Vec::new();
    for i in 0..4 {
        aging.extend(conn(Opcode::Insert, i, i == 1, 1 + i as u32));
    }
    v.push(("aging", descs(4, 3, &aging)));
    let replicas =
        vec![rd, re.expect("ext"), dd, de, CommandDescriptor::snapshot_sync_records(24, cd::DATA_IOVA, 8192, 0)];
    v.push(("replica-sync-records", descs(1, 0, &replicas)));
    v.push(("malformed", descs(0, 0, &[bad_op, chain_no_ext, reserved, nop])));
    v.push(("nops", descs(2, 0, &[nop; cd::MAX_DESCS])));
    let mut snap = conn(Opcode::Insert, 4, false, 0);
    snap.extend(conn(Opcode::Insert, 5, true, 0));
    snap.push(CommandDescriptor::snapshot(3, cd::DATA_IOVA, 80, 0));
    snap.push(CommandDescriptor::snapshot(4, cd::DATA_IOVA, 80, 1));
    snap.push(CommandDescriptor::snapshot(5, 0xdead_0000, 80, 0));
    v.push(("snapshot-walk", descs(0, 0, &snap)));
    v
}

// ----------------------------------------------------------- completion_event

/// A script for the scripted device, in the order host and device read it.
struct Script(Vec<u8>);

impl Script {
    fn new(header: [u8; 12], chunk_sel: u8) -> Self {
        let mut v = header.to_vec();
        v.push(chunk_sel);
        Script(v)
    }
    fn b(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }
    /// A device answer: honest (how 0), SUCCESS, then `extra` answer bytes,
    /// then `events` event bytes.
    fn ok(self, extra: &[u8]) -> Self {
        self.b(&[0, 0]).b(extra)
    }
    fn no_events(self) -> Self {
        self.b(&[0])
    }
}

fn completion_event() -> Seeds {
    let h = [0u8; 12];
    let mut evh = [0u8; 12];
    evh[1] = 1 << 2; // an event ring of 4
    let insert = |s: Script, i: u8| s.b(&[0, i, 7, 0]).ok(&[1, 0, 0, 0]).no_events();
    let lookup = |s: Script, i: u8| s.b(&[1, i]).ok(&[1, 0, 3, 1]).no_events();
    let snapshot = |s: Script| {
        // Two records (valid ConnRecords of keys 0 and 1), then DONE.
        s.b(&[6, 0]).ok(&[2, 0, 0, 5, 1, 4, 6, 1]).no_events()
    };
    let sync_chunk = |s: Script| s.b(&[7, 0]).ok(&[2, 0, 0, 5, 1, 2, 1, 6, 9, 3]).no_events();
    let mut v = Vec::new();
    let s = lookup(insert(Script::new(h, 0), 0), 0);
    v.push(("insert-lookup", s.0));
    let s = sync_chunk(snapshot(insert(Script::new(h, 3), 2)));
    v.push(("snapshots", s.0));
    let s = Script::new(h, 0)
        .b(&[2, 1])
        .b(&[4])
        .b(&[0x00, 0x00, 0x00, 0x03, 0x01, 0x00, 0x00, 0x01, 5, 0, 0, 0, 0, 0, 0, 0])
        .no_events()
        .b(&[4, 0])
        .b(&[5, 0])
        .no_events()
        .b(&[3, 2, 1, 1])
        .b(&[6, 0, 9, 0, 0, 0, 3, 0])
        .no_events()
        .b(&[0, 4, 1, 1])
        .b(&[7, 0, 2, 0, 0, 0])
        .no_events();
    v.push(("lying-device", s.0));
    // Events: an insert whose doorbell also posts an aged event and an
    // overflow, then the host polls them.
    let s = Script::new(evh, 0)
        .b(&[0, 0, 1, 0])
        .ok(&[1, 0, 0, 0])
        .b(&[2, 1, 0, 0, 7, 0, 0, 0, 2, 0, 5, 0, 0, 0, 8, 0, 0, 0])
        .b(&[8, 0]);
    v.push(("events", s.0));
    let mut batch = Script::new(h, 1).b(&[5, 5]);
    for j in 0..5u8 {
        batch = batch.b(&[1, 1, j]);
    }
    for _ in 0..5 {
        batch = batch.ok(&[1, 0, 0, 0]);
    }
    v.push(("batch", batch.no_events().0));
    let mut probe = h;
    probe[0] = 4;
    probe[8..12].copy_from_slice(&64u32.to_le_bytes());
    let s = snapshot(Script::new(probe, 0))
        .b(&[9, 0])
        .b(CommandDescriptor::header(Opcode::Nop, DescFlags::empty(), 0).as_bytes())
        .ok(&[])
        .no_events();
    v.push(("probe-capacity-raw-post", s.0));
    let mut fatal = h;
    fatal[3] = 2;
    v.push(("fatal", insert(insert(Script::new(fatal, 0), 0), 1).0));
    v
}

// ------------------------------------------------------------- fullsync_chunk

fn fs_stream(msgs: &[FsMessage], sender: u16, session: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        fullsync::encode(m, fs_::CLUSTER, sender, session, &mut out);
    }
    out
}

fn fullsync_chunk() -> Seeds {
    let recs = fs_::server_records();
    let (count, digest) = fullsync::digest_records(&recs);
    let server_side = |per: usize, end_digest: u64| {
        let mut m = vec![FsMessage::Begin {
            snapshot_seq: 41,
            epoch: 0xE90C,
            chunk_records: per as u32,
            estimated_records: 5,
            cut: Vec::new(),
        }];
        for (i, c) in recs.chunks(per).enumerate() {
            m.push(FsMessage::Chunk { index: i as u32, records: c.to_vec() });
        }
        m.push(FsMessage::End { count: count as u32, digest: end_digest });
        fs_stream(&m, fs_::SERVER, fs_::SESSION)
    };
    let with = |flags: u8, cuts: &[u8], stream: Vec<u8>| {
        let mut v = vec![flags, cuts.len() as u8];
        v.extend_from_slice(cuts);
        v.extend(stream);
        v
    };
    let client_req = |per: u32, acks: u32| {
        let mut m = vec![FsMessage::Request { chunk_records: per }];
        for i in 0..=acks {
            m.push(FsMessage::Ack { index: i });
        }
        fs_stream(&m, fs_::CLIENT, fs_::SESSION)
    };
    let error = fs_stream(
        &[FsMessage::Error { code: fullsync::error_code::ABORTED, reason: "device gone".into() }],
        fs_::SERVER,
        fs_::SESSION,
    );
    let mut bad_crc = server_side(4, digest);
    bad_crc[60] ^= 1;
    vec![
        ("client-happy", with(0x20, &[], server_side(4, digest))),
        ("client-split", with(0x20, &[0, 6, 30, 90], server_side(4, digest))),
        ("client-one-per-chunk", with(0x00, &[], server_side(1, digest))),
        ("client-bad-digest", with(0x20, &[], server_side(4, digest ^ 1))),
        ("client-error", with(0x08, &[], error)),
        ("client-fix-crc", with(0x22, &[], bad_crc)),
        ("client-misuse", with(0x24, &[10], server_side(2, digest))),
        // 5 records in chunks of 4: chunks 0 and 1, then END; the final ACK is 2.
        ("server-happy", with(0x21, &[], client_req(4, 2))),
        ("server-split", with(0x21, &[3, 0, 40], client_req(4, 2))),
        ("server-one-per-chunk", with(0x01, &[], client_req(1, 5))),
        ("server-eof", with(0x29, &[], client_req(4, 0))),
    ]
}

// ------------------------------------------------------------------------ ccp

fn ccp_msg(kind: MessageKind, sender: u16, seq: u32, st: MemberState, entries: Vec<Entry>) -> Vec<u8> {
    membership::Message {
        kind,
        yielding: false,
        cluster_id: ccp::CLUSTER,
        sender,
        incarnation: 0xABC0 + sender as u32,
        seq,
        state: st,
        mode: Mode::HighAvailability,
        digest: 0x1234,
        // Only a PROBE says which members its sender hears.
        entries: entries.into_iter().map(|e| Entry { heard: e.heard && kind == MessageKind::Probe, ..e }).collect(),
    }
    .encode()
    .expect("valid CCP message")
}

fn ccp() -> Seeds {
    let e = |member, state| Entry { member, state, heard: state != MemberState::Down };
    let query = ccp_msg(MessageKind::Query, 2, 1, MemberState::Down, vec![]);
    let probe2 = ccp_msg(
        MessageKind::Probe,
        2,
        2,
        MemberState::Active,
        vec![e(1, MemberState::Down), e(3, MemberState::Standby), e(4, MemberState::Down)],
    );
    let probe3 = ccp_msg(
        MessageKind::Probe,
        3,
        1,
        MemberState::Standby,
        vec![e(1, MemberState::Ready), e(2, MemberState::Active)],
    );
    let announce = ccp_msg(MessageKind::StateChange, 3, 2, MemberState::Ready, vec![e(3, MemberState::Ready)]);
    let command = ccp_msg(MessageKind::StateChange, 2, 3, MemberState::Active, vec![e(1, MemberState::Standby)]);
    let resync = ccp_msg(MessageKind::StateChange, 2, 4, MemberState::Active, vec![e(1, MemberState::Down)]);
    let ops = |flags: u8, items: &[&[u8]]| {
        let mut v = vec![flags];
        for it in items {
            v.extend_from_slice(it);
        }
        v
    };
    let dg = |m: &[u8]| {
        let mut v = vec![0];
        v.extend_from_slice(&(m.len() as u16).to_le_bytes());
        v.extend_from_slice(m);
        v
    };
    // Flag bit 2: each datagram says how long it waited (× 100 µs).
    let aged = |age: u16, m: &[u8]| {
        let mut v = vec![0];
        v.extend_from_slice(&age.to_le_bytes());
        v.extend_from_slice(&(m.len() as u16).to_le_bytes());
        v.extend_from_slice(m);
        v
    };
    let time = |units: u16| {
        let mut v = vec![1];
        v.extend_from_slice(&units.to_le_bytes());
        v
    };
    vec![
        ("join", ops(0, &[&dg(&query), &dg(&probe2), &[2], &time(150), &dg(&probe3)])),
        ("election", ops(0, &[&[2], &time(600), &dg(&announce), &time(120), &[3, 1], &time(200)])),
        ("commands", ops(0, &[&[2], &dg(&probe2), &dg(&command), &dg(&resync), &[4, 3], &[5, 1]])),
        ("failover", ops(2, &[&dg(&probe2), &dg(&probe3), &[2], &time(60000), &[4, 0], &[5, 0]])),
        ("stale", ops(1, &[&dg(&probe2), &dg(&probe2), &dg(&query)])),
        (
            "stall",
            ops(4, &[&aged(0, &query), &aged(0, &probe2), &[2], &time(700), &aged(600, &probe3), &time(10), &[5, 1]]),
        ),
        ("message-probe", probe2),
        ("message-command", command),
    ]
}

// --------------------------------------------------------------------- config

fn config(root: &Path) -> Seeds {
    let mut v: Seeds = Vec::new();
    for (name, file) in [("member1", "member1.toml"), ("member2", "member2.toml")] {
        if let Ok(text) = fs::read(root.join("examples/cluster").join(file)) {
            v.push((name, text));
        }
    }
    v.push(("minimal", b"member_id = 1\ncluster_id = 1\n".to_vec()));
    v.push((
        "ls-vfio",
        b"member_id = 2\ncluster_id = 9\nmode = \"ls\"\n\n[device]\nkind = \"vfio\"\nbdf = \"0000:01:00.0\"\n\
          table_capacity = 4096\n\n[control]\nsocket_mode = \"0660\"\nallow_uids = [0, 1000]\n\n\
          [[peer]]\nid = 1\nsync = \"10.0.0.1:8116\"\nmembership = \"10.0.0.1:8117\"\nfull_sync = \"10.0.0.1:8118\"\n"
            .to_vec(),
    ));
    v.push(("invalid", b"member_id = 1\ncluster_id = 1\n[membership]\ndead_after = 1\n".to_vec()));
    v
}

// ------------------------------------------------------------ control_request

fn control_request() -> Seeds {
    vec![
        ("state", b"{\"cmd\":\"state\"}\n".to_vec()),
        ("syncstat", b"{\"cmd\":\"syncstat\"}\n".to_vec()),
        ("resync", b"{\"cmd\":\"resync\",\"member\":2}\n".to_vec()),
        ("conn-list", b"{\"cmd\":\"conn_list\",\"limit\":10}\n".to_vec()),
        (
            "conn-get",
            b"{\"cmd\":\"conn_get\",\"key\":\"udp [2001:db8::1]:53 -> [2001:db8::2]:5353 zone 3\"}\n".to_vec(),
        ),
        (
            "conn-add",
            b"{\"cmd\":\"conn_add\",\"key\":\"tcp 10.0.0.1:40000 -> 192.0.2.1:443\",\"tcp_state\":\"syn-sent\",\
              \"timeout_s\":30,\"mark\":5,\"sync\":false}\n"
                .to_vec(),
        ),
        ("conn-del", b"{\"cmd\":\"conn_del\",\"key\":\"sctp 10.0.0.1:1 10.0.0.2:2\"}\n".to_vec()),
        ("conn-digest", b"{\"cmd\":\"conn_digest\"}\n".to_vec()),
        ("key", b"proto99 10.1.2.3:0 -> 10.3.2.1:0 zone 65535".to_vec()),
    ]
}

// ----------------------------------------------------------------------- seal

fn seal_seeds() -> Seeds {
    use nicsync_fuzz::seal as sl;
    let keys = sl::keyring().expect("keyring");
    let ring = keys.get();
    let key1 = ring.get(1).expect("key 1");
    let class = nicsync_seal::TrafficClass::Delta;
    let frame = hello(1, 1);
    let sealed_op = |key: u8, sender: u8, boot: u32, counter: u64, flip: u16, f: &[u8]| {
        let mut v = vec![1, key, sender];
        v.extend_from_slice(&boot.to_le_bytes());
        v.extend_from_slice(&counter.to_le_bytes());
        v.extend_from_slice(&flip.to_le_bytes());
        v.extend_from_slice(&(f.len() as u16).to_le_bytes());
        v.extend_from_slice(f);
        v
    };
    let raw_op = |op: u8, b: &[u8]| {
        let mut v = vec![op];
        v.extend_from_slice(&(b.len() as u16).to_le_bytes());
        v.extend_from_slice(b);
        v
    };
    let cat = |flags: u8, parts: &[Vec<u8>]| {
        let mut v = vec![flags];
        for p in parts {
            v.extend_from_slice(p);
        }
        v
    };
    let raw = sl::seal(key1, class, 1, 5, 0, &frame);
    let hex = |b: u8| format!("{b:02x}").repeat(32);
    let keyfile = format!("# cluster keys\nkey 1 {}\nkey 2 {}\nsend 2\n", hex(7), hex(9));
    let (_, client_hello) =
        nicsync_seal::channel::SecureChannel::client(keys.clone(), sl::CLUSTER, 2, 1).expect("client hello");
    vec![
        (
            "sealed-stream",
            cat(
                0,
                &[
                    sealed_op(1, 1, 5, 0, 0, &frame),
                    sealed_op(1, 1, 5, 1, 0, &delta(1, 2, false)),
                    sealed_op(2, 2, 9, 7, 0, &frame),
                ],
            ),
        ),
        (
            "replay-window",
            cat(
                0,
                &[
                    sealed_op(1, 1, 5, 70, 0, &frame),
                    sealed_op(1, 1, 5, 3, 0, &frame),
                    sealed_op(1, 1, 5, 70, 0, &frame),
                    sealed_op(1, 1, 6, 0, 0, &frame),
                    sealed_op(1, 1, 5, 200, 0, &frame),
                ],
            ),
        ),
        ("tampered", cat(0, &[sealed_op(1, 1, 5, 0, 0x0140, &frame), sealed_op(0, 3, 5, 0, 0, &frame)])),
        ("raw-datagram", cat(0, &[raw_op(0, &raw), raw_op(0, &raw)])),
        ("membership", cat(1, &[sealed_op(1, 2, 1, 1, 0, b"NCCP not really")])),
        ("channel-hello", cat(0, &[raw_op(2, &client_hello), raw_op(2, &[8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8])])),
        ("keyfile", cat(0, &[raw_op(3, keyfile.as_bytes())])),
    ]
}

fn write(dir: &Path, seeds: &Seeds, run: fn(&[u8])) {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("create corpus directory");
    for (name, bytes) in seeds {
        run(bytes);
        fs::write(dir.join(name), bytes).expect("write seed");
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
}

fn main() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = fuzz.parent().expect("fuzz/ has a parent").to_path_buf();
    let corpus = fuzz.join("corpus");
    write(&corpus.join("delta_frame"), &delta_frame(), df::run);
    write(&corpus.join("cmd_descriptor"), &cmd_descriptor(), cd::run);
    write(&corpus.join("completion_event"), &completion_event(), nicsync_fuzz::completion_event::run);
    write(&corpus.join("fullsync_chunk"), &fullsync_chunk(), fs_::run);
    write(&corpus.join("ccp"), &ccp(), ccp::run);
    write(&corpus.join("config"), &config(&root), nicsync_fuzz::config::run);
    write(&corpus.join("control_request"), &control_request(), nicsync_fuzz::control_request::run);
    write(&corpus.join("seal"), &seal_seeds(), nicsync_fuzz::seal::run);
}
