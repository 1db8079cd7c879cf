//! Service and backend ids: indexes into the data path's arrays.

use std::collections::BTreeSet;

use mim_lb_common::limits;

use super::DirectorError;

/// Hands out the lowest free id in a range.
pub(super) struct IdPool {
    used: BTreeSet<u32>,
    first: u32,
    end: u32,
    what: &'static str,
}

impl IdPool {
    fn new(first: u32, end: u32, what: &'static str) -> Self {
        IdPool { used: BTreeSet::new(), first, end, what }
    }

    pub(super) fn reserve(&mut self, id: u32) {
        self.used.insert(id);
    }

    /// Ids reserved or taken.
    pub(super) fn used(&self) -> usize {
        self.used.len()
    }

    pub(super) fn take(&mut self) -> Result<u32, DirectorError> {
        let id = (self.first..self.end)
            .find(|id| !self.used.contains(id))
            .ok_or(DirectorError::Capacity { what: self.what, max: self.end - self.first })?;
        self.used.insert(id);
        Ok(id)
    }
}

/// Both pools. Service ids index the Maglev maps and counters (`0..room`, the room for
/// services the maps were made with); backend ids index `BACKENDS`, where 0 means "no
/// backend" (`1..MAX_BACKENDS`).
pub(super) struct Pools {
    pub services: IdPool,
    pub backends: IdPool,
}

impl Pools {
    pub(super) fn new(service_room: u32) -> Self {
        Pools {
            services: IdPool::new(0, service_room.min(limits::MAX_SERVICES), "service"),
            backends: IdPool::new(1, limits::MAX_BACKENDS, "backend"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_id_and_a_clear_error_when_full() {
        let mut pool = IdPool::new(1, 4, "backend");
        pool.reserve(1);
        assert_eq!(pool.take().unwrap(), 2);
        assert_eq!(pool.take().unwrap(), 3);
        let err = pool.take().unwrap_err();
        assert_eq!(err.to_string(), "no free backend id: at most 3 at once, counting those still draining or being replaced");
    }
}
