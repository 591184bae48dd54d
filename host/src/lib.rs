//! nicsync host stack: the driver for the nicsync device, the
//! connection-table API, and the pieces of the `nicsync` command.
//!
//! * [`driver`]: bring-up (reset, ABI and capability check, rings,
//!   enable), batched submission with one doorbell per batch, completions
//!   by phase bit with polling or interrupts, events;
//! * [`table`]: [`table::ConnTable`], insert/update/delete/lookup, batches
//!   and snapshot iteration;
//! * [`bench`], [`demo`]: the `nicsync bench ring` and `nicsync demo` jobs.
// `unsafe` lives in one module, `sys` (a prefetch hint, the daemon's nice,
// kernel receive stamps on membership datagrams).
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
pub mod bench_ct;
pub mod bench_sync;
pub mod chaos;
pub mod cluster;
pub mod config;
pub mod control;
pub mod ctsync;
pub mod demo;
pub mod device;
pub mod driver;
pub mod fullsync;
pub mod irq;
pub mod keymap;
pub mod member;
pub mod membership;
pub mod node;
pub mod runtime;
pub mod secure;
pub mod shadow;
pub mod sim;
pub mod stats;
mod sys;
pub mod table;

pub use driver::{CompletionMode, Driver, DriverConfig, DriverError};
pub use table::{ConnEntry, ConnTable, TableError, TableOp};
