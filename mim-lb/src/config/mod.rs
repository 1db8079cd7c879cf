//! Configuration: schema, validation with key-naming errors.
