//! Protocol v1: the request on stdin and the events on stdout.

pub mod events;
pub mod request;
pub mod screen;
pub mod size;
