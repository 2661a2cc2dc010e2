//! Binary patches for rebuilt files. A recompiled executable shares little with its previous
//! build chunk by chunk (code moves, addresses change everywhere), yet a patch from one to the
//! other (`zstd --patch-from`: the old file as the reference window) is a fraction of the file.
//!
//! The distributor makes them after a release is stored (chunks first, patches when ready),
//! from the same path in the versions agents still run, and lists them per release in a
//! [`PatchList`] stored like a chunk under [`list_key`] of the release's tree root. The list is
//! **not signed** and need not be: a patch only ever produces a file whose BLAKE3 the signed
//! tree names, and the agent checks the result against it (and each piece against its name)
//! before using it, falling back to chunks otherwise. A forged list or patch can cost bytes,
//! never a wrong file.

use serde::{Deserialize, Serialize};

use crate::tree::Hash32;

/// Largest piece of a patch: pieces are stored and fetched exactly like chunks.
pub const MAX_PIECE: usize = 256 * 1024;
/// Largest encoded list (stored like a chunk, so under a chunk's limit).
pub const MAX_LIST_BYTES: usize = 256 * 1024;

/// The name a release's patch list is stored under (in place of a chunk's hash), from the
/// release's tree root (hex): one list per release, read with the same right as its chunks.
pub fn list_key(tree_root_hex: &str) -> String {
    format!("patches-{tree_root_hex}")
}

/// The patches made for one release, by the file they make and the file they start from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchList {
    /// Sorted by (file, base), each pair once.
    pub patches: Vec<Patch>,
}

/// One patch: applied to the file whose content is `base`, it makes the file `file`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patch {
    /// BLAKE3 of the file the patch makes (as the signed tree names it).
    pub file: Hash32,
    /// BLAKE3 of the file it must be applied to.
    pub base: Hash32,
    /// The patch's bytes (the sum of its pieces).
    pub len: u64,
    /// What the file's chunks the base lacks cost as stored: what a host holding the base
    /// would fetch without the patch. The agent takes the patch only when it is smaller.
    pub delta: u64,
    /// The patch's pieces, in order, each stored like a chunk under its BLAKE3.
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    pub id: Hash32,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PatchListError {
    #[error("patch list is {0} bytes, over the {MAX_LIST_BYTES}-byte limit")]
    TooBig(usize),
    #[error("patch list cannot be decoded: {0}")]
    Malformed(String),
}

impl PatchList {
    /// msgpack, as arrays (the field names are not repeated per patch).
    pub fn encode(&self) -> Result<Vec<u8>, PatchListError> {
        let bytes =
            rmp_serde::to_vec(self).map_err(|e| PatchListError::Malformed(e.to_string()))?;
        if bytes.len() > MAX_LIST_BYTES {
            return Err(PatchListError::TooBig(bytes.len()));
        }
        Ok(bytes)
    }

    /// Decodes a list and drops any patch that does not hold together (pieces that do not
    /// add up to its length, or a piece over the limit): a broken entry costs its patch, not
    /// the list.
    pub fn decode(bytes: &[u8]) -> Result<Self, PatchListError> {
        if bytes.len() > MAX_LIST_BYTES {
            return Err(PatchListError::TooBig(bytes.len()));
        }
        let mut list: PatchList =
            rmp_serde::from_slice(bytes).map_err(|e| PatchListError::Malformed(e.to_string()))?;
        list.patches.retain(Patch::is_consistent);
        Ok(list)
    }

    /// The patch that makes `file` from `base`, if the list has one.
    pub fn find(&self, file: &Hash32, base: &Hash32) -> Option<&Patch> {
        self.patches
            .binary_search_by(|p| (&p.file, &p.base).cmp(&(file, base)))
            .ok()
            .map(|i| &self.patches[i])
    }

    /// The patches that make `file`, from whatever base.
    pub fn making<'a>(&'a self, file: &'a Hash32) -> impl Iterator<Item = &'a Patch> + 'a {
        let start = self.patches.partition_point(|p| &p.file < file);
        self.patches[start..]
            .iter()
            .take_while(move |p| &p.file == file)
    }

    /// Adds a patch (replacing one for the same pair), keeping the order.
    pub fn insert(&mut self, patch: Patch) {
        match self
            .patches
            .binary_search_by(|p| (&p.file, &p.base).cmp(&(&patch.file, &patch.base)))
        {
            Ok(i) => self.patches[i] = patch,
            Err(i) => self.patches.insert(i, patch),
        }
    }
}

impl Patch {
    fn is_consistent(&self) -> bool {
        !self.pieces.is_empty()
            && self.pieces.iter().all(|p| p.len as usize <= MAX_PIECE)
            && self.pieces.iter().map(|p| u64::from(p.len)).sum::<u64>() == self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> Hash32 {
        Hash32([b; 32])
    }

    fn patch(file: u8, base: u8, pieces: &[u32]) -> Patch {
        Patch {
            file: h(file),
            base: h(base),
            len: pieces.iter().map(|&l| u64::from(l)).sum(),
            delta: 1000,
            pieces: pieces.iter().map(|&len| Piece { id: h(9), len }).collect(),
        }
    }

    #[test]
    fn a_list_round_trips_sorted_and_finds_by_file_and_base() {
        let mut list = PatchList::default();
        list.insert(patch(2, 1, &[10]));
        list.insert(patch(1, 3, &[20, 5]));
        list.insert(patch(1, 2, &[7]));
        list.insert(patch(1, 2, &[8]));
        let decoded = PatchList::decode(&list.encode().expect("encodes")).expect("decodes");
        assert_eq!(decoded, list);
        assert_eq!(decoded.patches.len(), 3);
        assert_eq!(decoded.find(&h(1), &h(2)).map(|p| p.len), Some(8));
        assert_eq!(decoded.find(&h(2), &h(2)), None);
        let bases: Vec<_> = decoded.making(&h(1)).map(|p| p.base).collect();
        assert_eq!(bases, vec![h(2), h(3)]);
    }

    #[test]
    fn inconsistent_patches_are_dropped_and_garbage_is_refused() {
        let mut list = PatchList::default();
        list.insert(patch(1, 2, &[10]));
        let mut bad = patch(3, 4, &[10]);
        bad.len = 11;
        list.patches.push(bad);
        list.patches.push(patch(5, 6, &[(MAX_PIECE + 1) as u32]));
        list.patches.push(patch(7, 8, &[]));
        let decoded = PatchList::decode(&list.encode().expect("encodes")).expect("decodes");
        assert_eq!(decoded.patches.len(), 1);
        assert!(matches!(
            PatchList::decode(b"not msgpack at all"),
            Err(PatchListError::Malformed(_))
        ));
        assert!(matches!(
            PatchList::decode(&vec![0u8; MAX_LIST_BYTES + 1]),
            Err(PatchListError::TooBig(_))
        ));
    }
}
