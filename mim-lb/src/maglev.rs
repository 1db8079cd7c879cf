//! Maglev table builder.
