//! The tracker: keeps the fleet inventory from agents' reports and drives staged rollouts.
//!
//! [`policy`] is the per-app rollout policy, [`fleet`] the inventory, [`rollout`] the pure
//! state machine.

pub mod fleet;
pub mod policy;
pub mod rollout;
