//! The agent: runs on every host, supervises the application and (next) updates it safely.
//!
//! Built so far: the supervisor ([`supervisor`]), which starts the app as a child in its own
//! process group, restarts it with backoff, pauses a crash loop, and stops it gracefully; the
//! install layout with its atomic switch ([`install`]); and the assembly of a verified version
//! from reused and fetched chunks ([`assemble`]).

pub mod assemble;
pub mod crash_policy;
pub mod health;
pub mod install;
pub mod journal;
pub mod supervisor;
