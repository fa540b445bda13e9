//! Sans-IO protocol codecs (DESIGN.md §7): bytes in, frames out. Nothing here touches a
//! socket; servers feed buffered bytes in and write the encoded replies out.

pub mod control;
pub mod http;
pub mod milter;
pub mod netstring;
pub mod policy;
pub mod socketmap;
