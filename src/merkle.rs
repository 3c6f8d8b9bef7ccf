//! RFC 6962 / RFC 9162 Merkle tree hashing, proofs and proof verification.
//!
//! Leaves are `SHA-256(0x00 || entry)`, interior nodes `SHA-256(0x01 || left || right)`,
//! so a leaf can never be passed off as a node. The tree over `n` leaves splits at the
//! largest power of two below `n`; every range this module hashes is either a complete,
//! aligned subtree (looked up from a [`NodeSource`]) or a right edge built from them, so
//! a proof costs O(log n) lookups however large the log is.

/// A 32-byte SHA-256 hash.
pub type Hash = [u8; 32];

/// Hash of a leaf's canonical encoding.
pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[0x00]);
    ctx.update(entry);
    to_hash(ctx.finish().as_ref())
}

/// Hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&[0x01]);
    ctx.update(left);
    ctx.update(right);
    to_hash(ctx.finish().as_ref())
}

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    to_hash(ring::digest::digest(&ring::digest::SHA256, b"").as_ref())
}

fn to_hash(b: &[u8]) -> Hash {
    let mut h = [0u8; 32];
    h.copy_from_slice(b);
    h
}

/// Largest power of two strictly below `n` (n ≥ 2).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// Where complete subtree hashes come from. `node(level, index)` is the hash of leaves
/// `[index << level, (index + 1) << level)`; it is only asked for subtrees that are
/// complete in the tree being proven.
pub trait NodeSource {
    /// Why a lookup failed.
    type Error;
    /// The hash of a complete, aligned subtree.
    fn node(&self, level: u32, index: u64) -> Result<Hash, Self::Error>;
}

/// Hash of leaves `[start, start + size)`; `start` is aligned to the subtree this range
/// belongs to (as in every range RFC 6962 recursion produces).
pub fn range_hash<S: NodeSource>(src: &S, start: u64, size: u64) -> Result<Hash, S::Error> {
    if size.is_power_of_two() && start.is_multiple_of(size) {
        return src.node(size.trailing_zeros(), start / size);
    }
    let k = split(size);
    let left = range_hash(src, start, k)?;
    let right = range_hash(src, start + k, size - k)?;
    Ok(node_hash(&left, &right))
}

/// Root of a tree of `size` leaves.
pub fn root<S: NodeSource>(src: &S, size: u64) -> Result<Hash, S::Error> {
    if size == 0 {
        return Ok(empty_root());
    }
    range_hash(src, 0, size)
}

/// Inclusion proof of leaf `index` in the tree of `size` leaves (RFC 9162 §2.1.3.1),
/// ordered from the leaf's sibling upward.
pub fn inclusion_proof<S: NodeSource>(
    src: &S,
    index: u64,
    size: u64,
) -> Result<Vec<Hash>, S::Error> {
    let mut out = Vec::new();
    path(src, index, 0, size, &mut out)?;
    Ok(out)
}

fn path<S: NodeSource>(
    src: &S,
    m: u64,
    start: u64,
    n: u64,
    out: &mut Vec<Hash>,
) -> Result<(), S::Error> {
    if n <= 1 {
        return Ok(());
    }
    let k = split(n);
    if m < k {
        path(src, m, start, k, out)?;
        out.push(range_hash(src, start + k, n - k)?);
    } else {
        path(src, m - k, start + k, n - k, out)?;
        out.push(range_hash(src, start, k)?);
    }
    Ok(())
}

/// Consistency proof from the tree of `old` leaves to the tree of `new` leaves
/// (RFC 9162 §2.1.4.1).
pub fn consistency_proof<S: NodeSource>(
    src: &S,
    old: u64,
    new: u64,
) -> Result<Vec<Hash>, S::Error> {
    let mut out = Vec::new();
    if old == 0 || old >= new {
        return Ok(out);
    }
    subproof(src, old, 0, new, true, &mut out)?;
    Ok(out)
}

fn subproof<S: NodeSource>(
    src: &S,
    m: u64,
    start: u64,
    n: u64,
    complete: bool,
    out: &mut Vec<Hash>,
) -> Result<(), S::Error> {
    if m == n {
        if !complete {
            out.push(range_hash(src, start, n)?);
        }
        return Ok(());
    }
    let k = split(n);
    if m <= k {
        subproof(src, m, start, k, complete, out)?;
        out.push(range_hash(src, start + k, n - k)?);
    } else {
        subproof(src, m - k, start + k, n - k, false, out)?;
        out.push(range_hash(src, start, k)?);
    }
    Ok(())
}

/// Why a proof does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProofError(pub String);

/// Verifies an inclusion proof (RFC 9162 §2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    proof: &[Hash],
    root: &Hash,
) -> Result<(), ProofError> {
    if index >= size {
        return Err(ProofError(format!(
            "leaf index {index} is outside a tree of {size}"
        )));
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if sn == 0 {
            return Err(ProofError("inclusion proof too long".into()));
        }
        if fn_ & 1 == 1 || fn_ == sn {
            r = node_hash(p, &r);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            r = node_hash(&r, p);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError("inclusion proof too short".into()));
    }
    if &r != root {
        return Err(ProofError(
            "inclusion proof does not lead to the root".into(),
        ));
    }
    Ok(())
}

/// Verifies a consistency proof between two roots (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old: u64,
    new: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), ProofError> {
    if old > new {
        return Err(ProofError("old tree is larger than the new one".into()));
    }
    if old == new {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else {
            Err(ProofError(
                "equal sizes need equal roots and an empty proof".into(),
            ))
        };
    }
    if old == 0 {
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(ProofError(
                "a proof from the empty tree must be empty".into(),
            ))
        };
    }
    let mut proof = proof.to_vec();
    if old.is_power_of_two() {
        proof.insert(0, *old_root);
    }
    let Some((first, rest)) = proof.split_first() else {
        return Err(ProofError("empty consistency proof".into()));
    };
    let (mut fn_, mut sn) = (old - 1, new - 1);
    while fn_ & 1 == 1 {
        fn_ >>= 1;
        sn >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if sn == 0 {
            return Err(ProofError("consistency proof too long".into()));
        }
        if fn_ & 1 == 1 || fn_ == sn {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    if sn != 0 {
        return Err(ProofError("consistency proof too short".into()));
    }
    if &fr != old_root || &sr != new_root {
        return Err(ProofError(
            "consistency proof does not reproduce both roots".into(),
        ));
    }
    Ok(())
}

/// The right edge of an append-only tree: one complete subtree root per set bit of the
/// size, largest first. Appending is O(1) amortized and yields the nodes it completed,
/// which is what a store persists so proofs never rescan the leaves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    /// (level, hash), levels strictly decreasing.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    /// The frontier of a tree of `size` leaves, read from its complete subtrees.
    pub fn load<S: NodeSource>(src: &S, size: u64) -> Result<Self, S::Error> {
        let mut nodes = Vec::new();
        let mut start = 0u64;
        for level in (0..64u32).rev() {
            if size & (1 << level) != 0 {
                nodes.push((level, src.node(level, start >> level)?));
                start += 1 << level;
            }
        }
        Ok(Self { size, nodes })
    }

    /// Leaves so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The subtree roots, largest first (one per set bit of the size): with the size,
    /// all a verifier that appends must keep.
    pub fn hashes(&self) -> Vec<Hash> {
        self.nodes.iter().map(|(_, h)| *h).collect()
    }

    /// A frontier from [`size`](Self::size) and [`hashes`](Self::hashes); `None` if the
    /// count does not match the size.
    pub fn from_hashes(size: u64, hashes: &[Hash]) -> Option<Self> {
        if hashes.len() != size.count_ones() as usize {
            return None;
        }
        let levels = (0..64u32).rev().filter(|l| size & (1 << l) != 0);
        Some(Self {
            size,
            nodes: levels.zip(hashes.iter().copied()).collect(),
        })
    }

    /// Appends a leaf; returns every node it completed as `(level, index, hash)`,
    /// the leaf itself (level 0) first.
    pub fn append(&mut self, leaf: Hash) -> Vec<(u32, u64, Hash)> {
        let index = self.size;
        let mut done = vec![(0, index, leaf)];
        let mut level = 0u32;
        let mut hash = leaf;
        while let Some(&(l, left)) = self.nodes.last() {
            if l != level {
                break;
            }
            self.nodes.pop();
            hash = node_hash(&left, &hash);
            level += 1;
            done.push((level, index >> level, hash));
        }
        self.nodes.push((level, hash));
        self.size += 1;
        done
    }

    /// The root of the tree so far.
    pub fn root(&self) -> Hash {
        let mut it = self.nodes.iter().rev();
        let Some(&(_, mut acc)) = it.next() else {
            return empty_root();
        };
        for (_, left) in it {
            acc = node_hash(left, &acc);
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Nodes kept in memory, as a store would persist them.
    #[derive(Default)]
    struct Mem(HashMap<(u32, u64), Hash>);

    impl NodeSource for Mem {
        type Error = String;
        fn node(&self, level: u32, index: u64) -> Result<Hash, String> {
            self.0
                .get(&(level, index))
                .copied()
                .ok_or_else(|| format!("missing node {level}/{index}"))
        }
    }

    /// The RFC 6962 definition, recursively over the leaves: the reference.
    fn mth(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&mth(&leaves[..k]), &mth(&leaves[k..]))
            }
        }
    }

    fn build(n: u64) -> (Mem, Vec<Hash>, Vec<Hash>) {
        let mut mem = Mem::default();
        let mut f = Frontier::default();
        let mut leaves = Vec::new();
        let mut roots = vec![empty_root()];
        for i in 0..n {
            let l = leaf_hash(format!("entry {i}").as_bytes());
            leaves.push(l);
            for (level, idx, h) in f.append(l) {
                mem.0.insert((level, idx), h);
            }
            roots.push(f.root());
        }
        (mem, leaves, roots)
    }

    /// A small deterministic generator (xorshift) so the property tests are reproducible.
    fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut x = seed;
        move |bound| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % bound
        }
    }

    #[test]
    fn frontier_roots_match_the_rfc_definition() {
        let (mem, leaves, roots) = build(130);
        for n in 0..=130u64 {
            let expected = mth(&leaves[..n as usize]);
            assert_eq!(roots[n as usize], expected, "size {n}");
            assert_eq!(
                root(&mem, n).expect("root"),
                expected,
                "size {n} from nodes"
            );
            let f = Frontier::load(&mem, n).expect("load");
            assert_eq!(f.root(), expected);
            // Saved and restored (a monitor's state), it keeps appending the same tree.
            let mut again = Frontier::from_hashes(n, &f.hashes()).expect("restore");
            if let Some(next) = leaves.get(n as usize) {
                again.append(*next);
                assert_eq!(again.root(), roots[n as usize + 1]);
            }
        }
        assert!(
            Frontier::from_hashes(3, &[[0; 32]]).is_none(),
            "3 needs two hashes"
        );
    }

    #[test]
    fn rfc_6962_known_answer() {
        // Empty tree and one-leaf tree of the empty entry (RFC 6962 test vectors).
        assert_eq!(
            hex::encode(empty_root()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(leaf_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
    }

    #[test]
    fn inclusion_proofs_verify_for_random_indexes_and_sizes() {
        let (mem, leaves, roots) = build(300);
        let mut r = rng(0x5eed);
        for _ in 0..2000 {
            let size = 1 + r(300);
            let index = r(size);
            let proof = inclusion_proof(&mem, index, size).expect("proof");
            let root = roots[size as usize];
            verify_inclusion(&leaves[index as usize], index, size, &proof, &root)
                .expect("verifies");
            // A wrong leaf, index or root fails.
            let other = leaves[((index + 1) % size) as usize];
            if size > 1 {
                assert!(verify_inclusion(&other, index, size, &proof, &root).is_err());
            }
            assert!(verify_inclusion(
                &leaves[index as usize],
                index,
                size,
                &proof,
                &leaf_hash(b"x")
            )
            .is_err());
        }
    }

    #[test]
    fn consistency_proofs_verify_for_random_sizes() {
        let (mem, _, roots) = build(300);
        let mut r = rng(0xc0ffee);
        for _ in 0..2000 {
            let new = 1 + r(300);
            let old = 1 + r(new);
            let proof = consistency_proof(&mem, old, new).expect("proof");
            verify_consistency(old, new, &roots[old as usize], &roots[new as usize], &proof)
                .expect("consistent");
            if old < new {
                // A forked old root is caught.
                assert!(verify_consistency(
                    old,
                    new,
                    &leaf_hash(b"fork"),
                    &roots[new as usize],
                    &proof
                )
                .is_err());
            }
        }
    }
}
