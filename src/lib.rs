//! reimage: rebuilds container and VM root volumes from images, atomically.
//!
//! A request flows one way: [`protocol`] parses it, [`config`] checks it against the root-owned
//! policy, [`ops`] measures the image ([`measure`]) and plans the sizes ([`plan`]) before
//! anything changes, then drives the storage [`drivers`] and the [`unpack`] engine, journaling
//! every destructive step ([`journal`]) so that [`recover`] can finish or undo it.

pub mod audit;
pub mod cli;
pub mod config;
pub mod confine;
pub mod drivers;
pub mod error;
pub mod fault;
pub mod image;
pub mod journal;
pub mod lock;
pub mod measure;
pub mod ops;
pub mod plan;
pub mod preserve;
pub mod privilege;
pub mod protocol;
pub mod recover;
pub mod signals;
pub mod unpack;
