//! Small helpers with no agent state: time ([`time`]) and files written atomically ([`fs`]).
//! Nothing here depends on another module of the agent.

pub mod admin_client;
pub mod fd_timer;
pub mod fs;
pub mod lock;
pub mod time;
