#![no_std]
// A library target lets mim-lb list this crate as a build dependency, so cargo rebuilds
// the embedded program when the shared types change.
