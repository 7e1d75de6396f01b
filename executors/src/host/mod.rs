//! Host helpers: everything an executor does to the machine goes through here.

pub mod cgroup;
pub mod leftover;
pub mod runner;
