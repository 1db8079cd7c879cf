//! The daemon's Unix control socket: one JSON request per connection, one JSON response.
//!
//! `protocol` holds the message types (the stable interface), `server` runs in the daemon,
//! `client` is what the CLI subcommands use.

pub mod client;
pub mod protocol;
pub mod server;
