//! The cache of bound tasks: least recently used first out, under a byte budget.
//!
//! A bound task is an immutable `Arc` (a runnable plan); the cache only decides which ones stay
//! alive between calls. Its cost is counted in the bytes of weights the task materialized, which is
//! what a bound plan keeps in memory (the template's constants are shared by all tasks and not
//! counted). An entry larger than the whole budget is never inserted: the caller still runs it
//! once and drops it.

use std::collections::HashMap;

/// An LRU map from task index to `V`, bounded by the sum of its entries' byte sizes.
#[derive(Debug)]
pub(crate) struct Lru<V> {
    budget: usize,
    bytes: usize,
    tick: u64,
    entries: HashMap<usize, Entry<V>>,
}

#[derive(Debug)]
struct Entry<V> {
    value: V,
    bytes: usize,
    last_use: u64,
}

impl<V: Clone> Lru<V> {
    /// An empty cache holding at most `budget` bytes.
    pub(crate) fn new(budget: usize) -> Self {
        Lru {
            budget,
            bytes: 0,
            tick: 0,
            entries: HashMap::new(),
        }
    }

    /// The entry of `key`, marked as most recently used.
    pub(crate) fn get(&mut self, key: usize) -> Option<V> {
        self.tick = self.tick.wrapping_add(1);
        let tick = self.tick;
        self.entries.get_mut(&key).map(|e| {
            e.last_use = tick;
            e.value.clone()
        })
    }

    /// Inserts (or replaces) `key`, evicting least recently used entries until the budget holds.
    /// Returns `false`, inserting nothing, if `bytes` alone exceeds the budget.
    pub(crate) fn insert(&mut self, key: usize, value: V, bytes: usize) -> bool {
        self.remove(key);
        if bytes > self.budget {
            return false;
        }
        self.make_room(bytes);
        self.tick = self.tick.wrapping_add(1);
        self.bytes = self.bytes.saturating_add(bytes);
        self.entries.insert(
            key,
            Entry {
                value,
                bytes,
                last_use: self.tick,
            },
        );
        true
    }

    /// Evicts least recently used entries until `bytes` more would fit in the budget (or the
    /// cache is empty). Called before an expensive insertion, so the memory of the evicted
    /// entries is free while the new one is being built.
    pub(crate) fn make_room(&mut self, bytes: usize) {
        while self.bytes.saturating_add(bytes) > self.budget {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_use)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.remove(oldest);
        }
    }

    /// Removes `key` if present.
    pub(crate) fn remove(&mut self, key: usize) {
        if let Some(e) = self.entries.remove(&key) {
            self.bytes = self.bytes.saturating_sub(e.bytes);
        }
    }

    /// Removes every entry.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Sum of the entries' sizes (never above the budget).
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Number of entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether `key` is cached (without touching its recency).
    pub(crate) fn contains(&self, key: usize) -> bool {
        self.entries.contains_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_first() {
        let mut c = Lru::new(30);
        assert!(c.insert(1, "a", 10));
        assert!(c.insert(2, "b", 10));
        assert!(c.insert(3, "c", 10));
        assert_eq!(c.get(1), Some("a")); // 2 is now the oldest
        assert!(c.insert(4, "d", 10));
        assert!(!c.contains(2));
        assert!(c.contains(1) && c.contains(3) && c.contains(4));
        assert_eq!(c.bytes(), 30);
        // A big entry evicts as many as needed.
        assert!(c.insert(5, "e", 25));
        assert_eq!(c.len(), 1);
        assert_eq!(c.bytes(), 25);
    }

    #[test]
    fn make_room_evicts_before_an_insertion() {
        let mut lru = Lru::new(10);
        lru.insert(1, "a", 4);
        lru.insert(2, "b", 4);
        lru.get(1);
        // 6 more bytes need 2 to go: the least recently used, key 2.
        lru.make_room(6);
        assert!(lru.contains(1) && !lru.contains(2));
        assert_eq!(lru.bytes(), 4);
    }

    #[test]
    fn oversized_entries_are_not_cached() {
        let mut c = Lru::new(5);
        assert!(!c.insert(1, "a", 6));
        assert_eq!((c.len(), c.bytes()), (0, 0));
        let mut zero = Lru::new(0);
        assert!(zero.insert(1, "empty", 0));
        assert!(!zero.insert(2, "b", 1));
        assert_eq!(zero.bytes(), 0);
    }

    #[test]
    fn replacing_an_entry_recounts_its_bytes() {
        let mut c = Lru::new(100);
        c.insert(1, "a", 40);
        c.insert(1, "a2", 10);
        assert_eq!(c.bytes(), 10);
        c.remove(1);
        assert_eq!(c.bytes(), 0);
        c.insert(2, "b", 1);
        c.clear();
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }
}
