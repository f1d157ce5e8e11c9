#![no_std]
// Library target so that the agent can declare this crate as a build dependency (cargo rebuilds
// the agent when it changes); the programs are in main.rs.
