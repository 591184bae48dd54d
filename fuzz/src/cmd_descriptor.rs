//! `cmd_descriptor`: the device's command path on arbitrary descriptors.
//!
//! Every run builds a fresh emulated device ([`nicsync_model::Nic`], in
//! [`ExecMode::Manual`] with a virtual clock, stepped by the harness), maps
//! its rings and one data window ([`DATA_IOVA`], for LOOKUP and SNAPSHOT
//! buffers) into its IOMMU, enables it, writes the fuzz descriptors into the
//! command ring, rings the doorbell (register, or the inline window with a
//! copy of the first descriptor) and steps the device. Then it checks the
//! completions and events the device wrote, lets time pass for aging, and
//! finally posts a NOP that must complete SUCCESS: the device still works.
//!
//! Input: `flags: u8`, `seconds: u8`, then up to [`MAX_DESCS`] descriptors
//! of 64 bytes (the last one zero-padded).
//!
//! | flags bit | meaning |
//! |---|---|
//! | 0 | ring through the inline doorbell window (first descriptor's aux is then 0, as the driver does) |
//! | 1 | force the first descriptor's tag to its slot (0), so the device uses the inline copy |
//! | 2 | aging on (period 1 ms); time then advances `seconds` s before the NOP |
//!
//! Checks: one completion per command in ring order, each a valid entry
//! echoing the command's tag and opcode with the ring head after it; a
//! descriptor that [`CommandDescriptor::decode`] refuses completes
//! INVALID_OPCODE or MALFORMED; no FATAL; every event decodes; the NOP
//! completes; and `decode` itself round-trips through `ConnOp::encode`.

use std::sync::Arc;
use std::time::Duration;

use nicsync_fwif::cmd::{Command, CommandDescriptor, DecodeError, Opcode, DESC_SIZE};
use nicsync_fwif::cpl::{CompletionEntry, CplStatus, CPL_SIZE};
use nicsync_fwif::event::{EventEntry, EVT_SIZE};
use nicsync_fwif::regs::{self, Control, Status};
use nicsync_model::dma::VecMemory;
use nicsync_model::{ExecMode, HostMemory, ModelConfig, Nic};
use zerocopy::{FromBytes, IntoBytes};

use crate::Reader;

/// IOVA of the command ring.
pub const CMD_IOVA: u64 = 0x1000_0000;
/// IOVA of the completion ring.
pub const CPL_IOVA: u64 = 0x2000_0000;
/// IOVA of the event ring.
pub const EVT_IOVA: u64 = 0x3000_0000;
/// IOVA of the data window (LOOKUP responses, SNAPSHOT buffers).
pub const DATA_IOVA: u64 = 0x4000_0000;
/// Size of the data window.
pub const DATA_LEN: usize = 8192;
/// log2 of the command ring size.
const CMD_LOG2: u32 = 4;
/// log2 of the completion ring size (room for every completion of a run).
const CPL_LOG2: u32 = 5;
/// log2 of the event ring size.
const EVT_LOG2: u32 = 4;
/// Descriptors taken from the input at most (the NOP needs one more slot).
pub const MAX_DESCS: usize = (1 << CMD_LOG2) - 2;
/// Tag of the final NOP.
const NOP_TAG: u16 = 0xBEEF;
/// Steps of the device per phase at most.
const MAX_STEPS: usize = 64;

/// `decode`, then (for connection commands) encode the decoded command
/// again and decode that: the same command must come back.
fn decode_round_trip(d: &CommandDescriptor, ext: Option<&CommandDescriptor>) -> Result<Command, DecodeError> {
    let c = d.decode(ext)?;
    let again = |op: Opcode, o: &nicsync_fwif::cmd::ConnOp| {
        let (d2, e2) = o.encode(op, d.tag.get());
        let c2 = d2.decode(e2.as_ref());
        assert_eq!(c2, Ok(c), "decode(encode(decode(d))) differs from decode(d)");
    };
    match &c {
        Command::Insert(o) => again(Opcode::Insert, o),
        Command::Update(o) => again(Opcode::Update, o),
        Command::Upsert(o) => again(Opcode::Upsert, o),
        _ => {}
    }
    Ok(c)
}

fn steps(nic: &Nic) {
    for _ in 0..MAX_STEPS {
        if !nic.step() {
            break;
        }
    }
}

fn mem(len: usize) -> Arc<VecMemory> {
    Arc::new(VecMemory::new(len))
}

fn entry<T: FromBytes>(m: &VecMemory, off: usize, size: usize) -> Option<T> {
    let mut b = vec![0u8; size];
    if !m.read(off, &mut b) {
        return None;
    }
    T::read_from_bytes(&b).ok()
}

/// The target.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let flags = r.u8();
    let seconds = r.u8();
    let (inline, force_tag, aging) = (flags & 1 != 0, flags & 2 != 0, flags & 4 != 0);
    let mut descs: Vec<CommandDescriptor> = Vec::new();
    while !r.is_empty() && descs.len() < MAX_DESCS {
        let raw: [u8; DESC_SIZE] = r.array();
        let Ok(d) = CommandDescriptor::read_from_bytes(&raw) else { return };
        descs.push(d);
    }
    if let Some(d0) = descs.first_mut() {
        if inline {
            d0.aux = 0.into();
        }
        if force_tag {
            d0.tag = 0.into();
        }
    }

    // The decoder on its own, with the EXT the device would pair.
    let n = descs.len();
    let ext_of = |i: usize| {
        let d = &descs[i];
        (d.is_chained() && i + 1 < n && descs[i + 1].opcode == Opcode::Ext as u8).then(|| descs[i + 1])
    };
    for i in 0..n {
        let _ = decode_round_trip(&descs[i], ext_of(i).as_ref());
        // Chained with whatever follows, EXT or not.
        let _ = descs[i].decode(descs.get(i + 1));
    }

    // A fresh device.
    let cfg = ModelConfig { max_capacity: 1024, default_capacity: 64, virtual_clock: true, ..Default::default() };
    let nic = Nic::new(cfg, ExecMode::Manual);
    let (cmd, cpl, evt, dat) =
        (mem(DESC_SIZE << CMD_LOG2), mem(CPL_SIZE << CPL_LOG2), mem(EVT_SIZE << EVT_LOG2), mem(DATA_LEN));
    for (iova, m) in [(CMD_IOVA, &cmd), (CPL_IOVA, &cpl), (EVT_IOVA, &evt), (DATA_IOVA, &dat)] {
        let m: Arc<dyn HostMemory> = m.clone();
        if nic.iommu().map(iova, m).is_err() {
            return;
        }
    }
    for (off, v) in [
        (regs::CMD_BASE_LO, CMD_IOVA as u32),
        (regs::CMD_BASE_HI, (CMD_IOVA >> 32) as u32),
        (regs::CMD_LOG2_SIZE, CMD_LOG2),
        (regs::CPL_BASE_LO, CPL_IOVA as u32),
        (regs::CPL_BASE_HI, (CPL_IOVA >> 32) as u32),
        (regs::CPL_LOG2_SIZE, CPL_LOG2),
        (regs::EVT_BASE_LO, EVT_IOVA as u32),
        (regs::EVT_BASE_HI, (EVT_IOVA >> 32) as u32),
        (regs::EVT_LOG2_SIZE, EVT_LOG2),
        (regs::TABLE_CAPACITY, 64),
        (regs::AGING_PERIOD_MS, u32::from(aging)),
        (regs::IRQ_COALESCE_COUNT, 1),
        (regs::IRQ_COALESCE_USEC, 0),
        (regs::CONTROL, Control::ENABLE.bits()),
    ] {
        nic.mmio_write(off, v);
    }
    steps(&nic);
    let status = || Status::from_bits_truncate(nic.mmio_read(regs::STATUS));
    assert!(status().contains(Status::ENABLED), "device did not enable: {:?}", status());

    // Post the fuzz descriptors and ring once.
    for (i, d) in descs.iter().enumerate() {
        assert!(cmd.write(i * DESC_SIZE, d.as_bytes()));
    }
    if n > 0 {
        if inline {
            let mut d = descs[0];
            d.aux = regs::inline_doorbell(n as u16, 2).into();
            let words: [u64; 8] = zerocopy::transmute!(d);
            nic.mmio_write_inline(regs::CMD_INLINE, &words);
        } else {
            nic.mmio_write(regs::CMD_DOORBELL, n as u32);
        }
        steps(&nic);
    }
    assert!(!status().contains(Status::FATAL), "descriptors made the device FATAL");
    assert_eq!(nic.mmio_read(regs::CMD_HEAD), n as u32, "the device did not consume every posted slot");

    // One completion per command, in ring order.
    let mut k = 0; // completions read
    let mut i = 0; // slot of the next command
    while i < n {
        let ext = ext_of(i);
        let slots = if ext.is_some() { 2 } else { 1 };
        let e: CompletionEntry = entry(&cpl, k * CPL_SIZE, CPL_SIZE).expect("completion ring readable");
        assert!(e.phase_bit(), "no completion for the command in slot {i}");
        let c = e.decode().expect("the device wrote a completion that does not decode");
        let d = &descs[i];
        assert_eq!((c.tag, c.opcode), (d.tag.get(), d.opcode), "completion {k} does not echo slot {i}");
        assert_eq!(c.cmd_head as usize, i + slots, "completion {k}: ring head");
        match d.decode(ext.as_ref()) {
            Err(DecodeError::UnknownOpcode(_)) => assert_eq!(c.status, CplStatus::InvalidOpcode),
            Err(_) => assert_eq!(c.status, CplStatus::Malformed),
            Ok(_) => assert!(!matches!(c.status, CplStatus::InvalidOpcode)),
        }
        k += 1;
        i += slots;
    }
    let extra: CompletionEntry = entry(&cpl, k * CPL_SIZE, CPL_SIZE).expect("completion ring readable");
    assert!(!extra.phase_bit(), "more completions than commands");

    // Aging (events), then every event the device wrote must decode.
    if aging {
        nic.advance_time(Duration::from_secs(u64::from(seconds)));
        steps(&nic);
    }
    for j in 0..(1usize << EVT_LOG2) {
        let e: EventEntry = entry(&evt, j * EVT_SIZE, EVT_SIZE).expect("event ring readable");
        if !e.phase_bit() {
            break;
        }
        if let Err(why) = e.decode() {
            panic!("the device wrote event {j} that does not decode: {why}");
        }
    }

    // The device still answers.
    let mut nop = CommandDescriptor::header(Opcode::Nop, nicsync_fwif::cmd::DescFlags::empty(), NOP_TAG);
    nop.aux = 0.into();
    assert!(cmd.write(n * DESC_SIZE, nop.as_bytes()));
    nic.mmio_write(regs::CMD_DOORBELL, (n + 1) as u32);
    steps(&nic);
    let e: CompletionEntry = entry(&cpl, k * CPL_SIZE, CPL_SIZE).expect("completion ring readable");
    assert!(e.phase_bit(), "the device did not complete a NOP after the fuzz descriptors");
    let c = e.decode().expect("NOP completion decodes");
    assert_eq!((c.tag, c.status, c.cmd_head as usize), (NOP_TAG, CplStatus::Success, n + 1));
    assert!(!status().contains(Status::FATAL));
}
