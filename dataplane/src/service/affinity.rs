//! `sessionAffinity: ClientIP`: which endpoint a client was last sent to
//! per frontend, until the Service's timeout passes without a new flow
//! (kube-proxy's `recent` match refreshes on each new connection, too).
//! A fixed set-associative cache: an insert into a full set replaces the
//! entry that expires first, so memory never grows.

use super::hash::hash2;

const WAYS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    client: u32,
    /// Packed frontend (ip, port, protocol).
    frontend: u64,
    backend_ip: u32,
    backend_port: u16,
    expires: u64,
}

const VACANT: Entry = Entry {
    client: 0,
    frontend: 0,
    backend_ip: 0,
    backend_port: 0,
    expires: 0,
};

pub struct AffinityTable {
    entries: Box<[Entry]>,
    sets: usize,
    seed: u64,
}

impl AffinityTable {
    /// Room for about `capacity` clients (at least one set).
    pub fn new(capacity: usize, seed: u64) -> Self {
        let sets = capacity.div_ceil(WAYS).max(1);
        AffinityTable {
            entries: vec![VACANT; sets * WAYS].into_boxed_slice(),
            sets,
            seed,
        }
    }

    /// The endpoint this client is pinned to through `frontend`, if the pin
    /// has not expired.
    pub fn get(&self, client: u32, frontend: u64, now: u64) -> Option<(u32, u16)> {
        self.set(client, frontend)
            .iter()
            .find(|e| e.expires > now && e.client == client && e.frontend == frontend)
            .map(|e| (e.backend_ip, e.backend_port))
    }

    /// Pins the client to an endpoint until `expires`.
    pub fn put(&mut self, client: u32, frontend: u64, backend: (u32, u16), expires: u64) {
        let start = self.set_start(client, frontend);
        let set = &mut self.entries[start..start + WAYS];
        let slot = match set
            .iter()
            .position(|e| e.expires != 0 && e.client == client && e.frontend == frontend)
        {
            Some(same) => same,
            None => set
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.expires)
                .map_or(0, |(i, _)| i),
        };
        set[slot] = Entry {
            client,
            frontend,
            backend_ip: backend.0,
            backend_port: backend.1,
            expires,
        };
    }

    fn set_start(&self, client: u32, frontend: u64) -> usize {
        (hash2(self.seed, u64::from(client), frontend) % self.sets as u64) as usize * WAYS
    }

    fn set(&self, client: u32, frontend: u64) -> &[Entry] {
        let start = self.set_start(client, frontend);
        &self.entries[start..start + WAYS]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_until_the_timeout() {
        let mut table = AffinityTable::new(64, 9);
        table.put(1, 77, (5, 80), 1000);
        assert_eq!(table.get(1, 77, 999), Some((5, 80)));
        assert_eq!(table.get(1, 77, 1000), None);
        assert_eq!(table.get(1, 78, 10), None, "pins are per frontend");
        table.put(1, 77, (6, 80), 2000);
        assert_eq!(table.get(1, 77, 1500), Some((6, 80)));
    }

    #[test]
    fn never_grows() {
        let mut table = AffinityTable::new(16, 9);
        for client in 0..10_000 {
            table.put(client, 1, (2, 3), 100 + u64::from(client));
        }
        assert_eq!(table.entries.len(), 16);
        assert_eq!(
            table.get(9_999, 1, 0),
            Some((2, 3)),
            "the newest pin survives"
        );
    }
}
