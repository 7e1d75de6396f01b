//! The reference control plane (work in progress).
pub mod db;
pub mod error;
pub mod util;
