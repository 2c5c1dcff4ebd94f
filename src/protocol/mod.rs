//! Protocol v1: the request on stdin and the events on stdout.

pub mod event;
pub mod events;
pub mod request;
pub mod results;
pub mod schema;
pub mod screen;
pub mod size;
