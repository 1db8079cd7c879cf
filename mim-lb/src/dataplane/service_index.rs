//! Service index placement.
