//! Placeholder, being written.
/// Placeholder.
#[derive(Debug)]
pub struct VfioDevice;
/// Placeholder.
pub fn parse_bdf(s: &str) -> Option<(u16, u8, u8, u8)> { let _ = s; None }
