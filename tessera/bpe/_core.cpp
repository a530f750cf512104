// Compiled core of the 2-D visual BPE (see DESIGN.md "Visual BPE — the exact contract" and
// tessera/bpe/reference.py, the literal transcription this must agree with).
//
// A corpus is many grids concatenated; a cell is a flat position. `tile[p]` is the id of the
// tile anchored at p, or -1 if p is covered by a tile anchored elsewhere; `back[p]` is p's
// (row, column) offset from the anchor of the tile covering it, 4 bits each (one byte a cell, not
// an int32 owner map: tiles are at most 16 x 16). Ids have fixed shapes (sh[id], sw[id]).
//
// Memory of a shard (a billion-cell corpus must fit in a few shards): tile 2 B (uint16 ids while
// the vocabulary has at most 65,535 ids, else 4 B) + back 1 B per cell, and the position index
// sized exactly at the count (two passes: counts, then reserved vectors), about 2 entries x 4 B
// per cell at its peak. Entries go stale as tiles merge; when
// they outnumber the live pairs by half, the index drops them (`compact`), so it shrinks with
// the tiling instead of growing with every merge.
//
//   Shard  — holds grids, a lazy position index (pair key -> anchors of first tiles; entries
//            are validated when used, never deleted eagerly) and applies merges, returning
//            only the count deltas they caused: per-merge cost ∝ occurrences touched.
//   Table  — the global pair counts F and a lazy max-heap by (F desc, a, b, h<v) from which
//            the top_k eligible pairs are read; the spatial-consistency priority is computed
//            exactly for those k from current counts, so a sibling's change is never missed.
//   encode — replays merges on one grid with a min-heap of merge ranks over the grid's pairs
//            (lazy invalidation): O(cells log cells), not O(merges x cells).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <queue>
#include <stdexcept>
#include <unordered_map>
#include <vector>

namespace py = pybind11;
using i32 = int32_t;
using i64 = int64_t;
using u64 = uint64_t;
using Key = u64;

static constexpr int H_DIR = 0, V_DIR = 1;
static constexpr i32 MAX_SIDE = 16;  // `back` packs offsets inside a tile in 4 bits each

static void check_side(i32 h, i32 w) {
  if (h < 1 || w < 1 || h > MAX_SIDE || w > MAX_SIDE)
    throw std::invalid_argument("tile shapes must lie in 1..16 x 1..16 (the core packs offsets in 4 bits)");
}

// (a, b, d) -> key; key order == lexicographic (a, b, d) order, which the tie-breaks rely on.
static inline Key make_key(i64 a, i64 b, int d) { return ((u64)a << 32) | ((u64)b << 1) | (u64)d; }
static inline i64 key_a(Key k) { return (i64)(k >> 32); }
static inline i64 key_b(Key k) { return (i64)((k >> 1) & 0x7FFFFFFF); }
static inline int key_d(Key k) { return (int)(k & 1); }

struct Shapes {
  std::vector<i32> h, w;
  void add(i32 hh, i32 ww) { h.push_back(hh); w.push_back(ww); }
};

// Tile ids as stored: `none` marks a cell covered by a tile anchored elsewhere.
template <typename T> struct TileIds;
template <> struct TileIds<i32> {
  static constexpr i32 none = -1;
  static constexpr i64 max_id = INT32_MAX - 1;
};
template <> struct TileIds<uint16_t> {
  static constexpr uint16_t none = 0xFFFF;
  static constexpr i64 max_id = 0xFFFE;
};

// One or many grids, concatenated.
template <typename T>
struct Tiling {
  static constexpr T NONE = TileIds<T>::none;
  std::vector<T> tile;
  std::vector<uint8_t> back;
  std::vector<i64> offset;  // start of each grid, plus the total at the end
  std::vector<i32> H, W;
  const Shapes* shapes = nullptr;

  // Anchor of the tile covering cell p of grid g.
  i64 owner(i64 p, int g) const {
    uint8_t o = back[p];
    return p - (i64)(o >> 4) * W[g] - (o & 15);
  }
  int grid_of(i64 p) const {
    return (int)(std::upper_bound(offset.begin(), offset.end(), p) - offset.begin()) - 1;
  }
  // Anchor of the tile adjacent to the tile anchored at p in direction d (contract's adjacency), or -1.
  i64 next(i64 p, int d, int g) const {
    i32 id = tile[p];
    i32 h = shapes->h[id], w = shapes->w[id];
    i64 local = p - offset[g];
    i32 r = (i32)(local / W[g]), c = (i32)(local % W[g]);
    if (d == H_DIR) {
      if (c + w >= W[g]) return -1;
      i64 q = p + w;
      return (tile[q] != NONE && shapes->h[tile[q]] == h) ? q : -1;
    }
    if (r + h >= H[g]) return -1;
    i64 q = p + (i64)h * W[g];
    return (tile[q] != NONE && shapes->w[tile[q]] == w) ? q : -1;
  }
  // Anchor of the tile X with (X, tile at p, d) adjacent, or -1.
  i64 prev(i64 p, int d, int g) const {
    i32 id = tile[p];
    i64 local = p - offset[g];
    i32 r = (i32)(local / W[g]), c = (i32)(local % W[g]);
    if (d == H_DIR) {
      if (c == 0) return -1;
      i64 o = owner(p - 1, g);
      if ((o - offset[g]) / W[g] != r) return -1;
      return shapes->h[tile[o]] == shapes->h[id] ? o : -1;
    }
    if (r == 0) return -1;
    i64 o = owner(p - W[g], g);
    if ((o - offset[g]) % W[g] != c) return -1;
    return shapes->w[tile[o]] == shapes->w[id] ? o : -1;
  }
  // Pairs (first anchor, second anchor, d) that the tile anchored at p takes part in.
  void pairs_around(i64 p, int g, std::vector<std::tuple<i64, i64, int>>& out) const {
    for (int d = 0; d < 2; ++d) {
      i64 q = next(p, d, g);
      if (q >= 0) out.emplace_back(p, q, d);
      i64 o = prev(p, d, g);
      if (o >= 0) out.emplace_back(o, p, d);
    }
  }
  // Merge the tiles anchored at p and q into new_id anchored at p (shapes already know new_id).
  void merge(i64 p, i64 q, i32 new_id, int g) {
    i32 b = tile[q];
    i32 hb = shapes->h[b], wb = shapes->w[b];
    tile[p] = (T)new_id;
    tile[q] = NONE;
    i64 rel = q - p;  // b's anchor relative to p: (0, wa) or (ha, 0)
    i32 qr = (i32)(rel / W[g]), qc = (i32)(rel % W[g]);
    for (i32 dr = 0; dr < hb; ++dr)
      for (i32 dc = 0; dc < wb; ++dc) back[q + (i64)dr * W[g] + dc] = (uint8_t)(((qr + dr) << 4) | (qc + dc));
  }
  void init_back() {
    back.assign(tile.size(), 0);
    for (size_t g = 0; g + 1 < offset.size(); ++g) {
      for (i64 p = offset[g]; p < offset[g + 1]; ++p) {
        if (tile[p] == NONE) continue;
        i32 id = tile[p];
        if (id >= (i32)shapes->h.size()) throw std::invalid_argument("tile id without a shape");
        for (i32 dr = 0; dr < shapes->h[id]; ++dr)
          for (i32 dc = 0; dc < shapes->w[id]; ++dc) back[p + (i64)dr * W[g] + dc] = (uint8_t)((dr << 4) | dc);
      }
    }
  }
};

template <typename T>
struct Shard {
  static constexpr T NONE = TileIds<T>::none;
  Shapes shapes;
  Tiling<T> t;
  std::unordered_map<Key, std::vector<i32>> where;

  i64 entries_ = 0;      // index entries (live or stale)
  i64 live_ = 0;         // live pairs: the sum of this shard's pair counts
  i64 compactions_ = 0;
  i64 compact_min = 65536;  // stale entries tolerated beyond half the live ones (tests set 0)

  Shard(py::array_t<i32, py::array::c_style | py::array::forcecast> tiles, std::vector<i64> offsets, std::vector<i32> hs,
        std::vector<i32> ws, std::vector<i32> shape_h, std::vector<i32> shape_w) {
    shapes.h = std::move(shape_h);
    shapes.w = std::move(shape_w);
    if (shapes.h.size() != shapes.w.size()) throw std::invalid_argument("shape_h and shape_w differ in length");
    for (size_t i = 0; i < shapes.h.size(); ++i) check_side(shapes.h[i], shapes.w[i]);
    t.shapes = &shapes;
    if ((size_t)tiles.size() >= (size_t)INT32_MAX) throw std::invalid_argument("a shard holds at most 2^31 cells");
    t.tile.resize(tiles.size());
    const i32* src = tiles.data();
    for (py::ssize_t i = 0; i < tiles.size(); ++i) {  // -1 (covered) -> NONE
      if (src[i] < -1 || src[i] > TileIds<T>::max_id) throw std::invalid_argument("tile id outside what this shard stores");
      t.tile[i] = src[i] < 0 ? NONE : (T)src[i];
    }
    t.offset = std::move(offsets);
    t.H = std::move(hs);
    t.W = std::move(ws);
    if (t.offset.size() != t.H.size() + 1 || (size_t)t.offset.back() != t.tile.size())
      throw std::invalid_argument("offsets do not match the tiles");
    t.init_back();
  }

  // Pair counts of the current tiling; fills the position index. -> (keys, counts)
  std::pair<py::array_t<u64>, py::array_t<i64>> count() {
    std::unordered_map<Key, std::vector<i32>>().swap(where);
    std::unordered_map<Key, i64> counts;
    // visit(k, p) for every pair (anchor p, key k) of the current tiling, in raster order
    auto each_pair = [&](auto&& visit) {
      for (size_t g = 0; g + 1 < t.offset.size(); ++g) {
        for (i64 p = t.offset[g]; p < t.offset[g + 1]; ++p) {
          if (t.tile[p] == NONE) continue;
          for (int d = 0; d < 2; ++d) {
            i64 q = t.next(p, d, (int)g);
            if (q >= 0) visit(make_key(t.tile[p], t.tile[q], d), p);
          }
        }
      }
    };
    each_pair([&](Key k, i64) { counts[k] += 1; });
    // the second pass fills vectors reserved to their exact size: no growth slack
    where.reserve(counts.size());
    i64 total = 0;
    for (auto& [k, c] : counts) {
      where[k].reserve((size_t)c);
      total += c;
    }
    each_pair([&](Key k, i64 p) { where.find(k)->second.push_back((i32)p); });
    entries_ = live_ = total;
    return to_arrays(counts);
  }

  // Drop index entries that no longer name their pair (see the header), and emptied keys.
  void compact() {
    i64 kept = 0;
    for (auto it = where.begin(); it != where.end();) {
      Key k = it->first;
      i64 a = key_a(k), b = key_b(k);
      int d = key_d(k);
      auto& v = it->second;
      size_t n = 0;
      for (i32 p32 : v) {
        i64 p = p32;
        if (t.tile[p] != a) continue;
        i64 q = t.next(p, d, t.grid_of(p));
        if (q >= 0 && t.tile[q] == b) v[n++] = p32;
      }
      if (n == 0) {
        it = where.erase(it);
        continue;
      }
      v.resize(n);
      if (v.capacity() > n + n / 4 + 8) v.shrink_to_fit();
      kept += (i64)n;
      ++it;
    }
    entries_ = kept;
    ++compactions_;
  }

  // Apply merge (a, b, d) -> new_id of shape (nh, nw). -> (keys, deltas, merged occurrences)
  py::tuple apply(i64 a, i64 b, int d, i32 new_id, i32 nh, i32 nw) {
    if ((size_t)new_id != shapes.h.size()) throw std::invalid_argument("merges must be applied in order");
    if (new_id > TileIds<T>::max_id) throw std::invalid_argument("new id beyond what this shard stores");
    check_side(nh, nw);
    shapes.add(nh, nw);
    std::unordered_map<Key, i64> delta;
    i64 merged = 0;
    auto it = where.find(make_key(a, b, d));
    if (it != where.end()) {
      std::vector<i32> occ = std::move(it->second);
      where.erase(it);
      entries_ -= (i64)occ.size();
      std::sort(occ.begin(), occ.end());  // raster order of anchors (grids are concatenated row-major)
      occ.erase(std::unique(occ.begin(), occ.end()), occ.end());
      std::vector<std::tuple<i64, i64, int>> old_pairs, new_pairs;
      for (i32 p32 : occ) {
        i64 p = p32;
        if (t.tile[p] != a) continue;  // stale, or consumed earlier in this pass
        int g = t.grid_of(p);
        i64 q = t.next(p, d, g);
        if (q < 0 || t.tile[q] != b) continue;
        old_pairs.clear();
        t.pairs_around(p, g, old_pairs);
        t.pairs_around(q, g, old_pairs);
        std::sort(old_pairs.begin(), old_pairs.end());
        old_pairs.erase(std::unique(old_pairs.begin(), old_pairs.end()), old_pairs.end());
        for (auto& [x, y, dd] : old_pairs) delta[make_key(t.tile[x], t.tile[y], dd)] -= 1;
        t.merge(p, q, new_id, g);
        new_pairs.clear();
        t.pairs_around(p, g, new_pairs);
        for (auto& [x, y, dd] : new_pairs) {
          Key k = make_key(t.tile[x], t.tile[y], dd);
          delta[k] += 1;
          where[k].push_back((i32)x);
          ++entries_;
        }
        ++merged;
      }
    }
    for (auto i = delta.begin(); i != delta.end();) i = (i->second == 0) ? delta.erase(i) : std::next(i);
    for (auto& kv : delta) live_ += kv.second;
    if (entries_ > live_ + live_ / 2 + compact_min) compact();
    auto [keys, vals] = to_arrays(delta);
    return py::make_tuple(keys, vals, merged);
  }

  // The anchor map as int32 (-1 = covered), whatever this shard stores.
  py::array_t<i32> tiles() const {
    py::array_t<i32> out(t.tile.size());
    i32* dst = out.mutable_data();
    for (size_t i = 0; i < t.tile.size(); ++i) dst[i] = t.tile[i] == NONE ? -1 : (i32)t.tile[i];
    return out;
  }
  i64 num_tiles() const {
    i64 n = 0;
    for (T v : t.tile) n += v != NONE;
    return n;
  }
  i64 index_entries() const { return entries_; }
  i64 num_cells() const { return (i64)t.tile.size(); }
  i64 num_keys() const { return (i64)where.size(); }
  i64 compactions() const { return compactions_; }

  static std::pair<py::array_t<u64>, py::array_t<i64>> to_arrays(const std::unordered_map<Key, i64>& m) {
    std::vector<std::pair<Key, i64>> items(m.begin(), m.end());
    std::sort(items.begin(), items.end());  // deterministic order
    py::array_t<u64> keys(items.size());
    py::array_t<i64> vals(items.size());
    auto* kp = keys.mutable_data();
    auto* vp = vals.mutable_data();
    for (size_t i = 0; i < items.size(); ++i) {
      kp[i] = items[i].first;
      vp[i] = items[i].second;
    }
    return {keys, vals};
  }
};

struct HeapEntry {
  i64 f;
  Key k;
};
// priority_queue pops the "largest": larger F first, then smaller key (a, b, d).
struct HeapLess {
  bool operator()(const HeapEntry& x, const HeapEntry& y) const { return x.f != y.f ? x.f < y.f : x.k > y.k; }
};

struct Table {
  Shapes shapes;
  std::unordered_map<Key, i64> F;
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, HeapLess> heap;
  i32 max_h, max_w;
  i64 min_frequency;

  Table(std::vector<i32> shape_h, std::vector<i32> shape_w, i32 max_h_, i32 max_w_, i64 min_frequency_)
      : max_h(max_h_), max_w(max_w_), min_frequency(min_frequency_) {
    shapes.h = std::move(shape_h);
    shapes.w = std::move(shape_w);
  }

  bool shape_ok(Key k) const {
    i64 a = key_a(k), b = key_b(k);
    int d = key_d(k);
    i32 mh = d == H_DIR ? shapes.h[a] : shapes.h[a] + shapes.h[b];
    i32 mw = d == H_DIR ? shapes.w[a] + shapes.w[b] : shapes.w[a];
    return mh <= max_h && mw <= max_w;
  }

  void add(py::array_t<u64, py::array::c_style | py::array::forcecast> keys,
           py::array_t<i64, py::array::c_style | py::array::forcecast> deltas) {
    const u64* kp = keys.data();
    const i64* dp = deltas.data();
    for (py::ssize_t i = 0; i < keys.size(); ++i) {
      Key k = kp[i];
      i64 f = (F[k] += dp[i]);
      if (f < 0) throw std::runtime_error("negative pair count: shards and table disagree");
      if (f == 0) {
        F.erase(k);
        continue;
      }
      if (f >= min_frequency && shape_ok(k)) heap.push({f, k});
    }
  }

  void add_shape(i32 h, i32 w) { shapes.add(h, w); }

  i64 get(i64 a, i64 b, int d) const {
    auto it = F.find(make_key(a, b, d));
    return it == F.end() ? 0 : it->second;
  }

  // The contract's choice, or (-1, -1, -1) when nothing is eligible. -> (a, b, d, F, P)
  py::tuple choose(int top_k, double alpha) {
    std::vector<HeapEntry> top;
    while (!heap.empty() && (int)top.size() < top_k) {
      HeapEntry e = heap.top();
      heap.pop();
      auto it = F.find(e.k);
      if (it == F.end() || it->second != e.f) continue;  // stale
      bool dup = false;
      for (auto& x : top) dup |= x.k == e.k;
      if (!dup) top.push_back(e);
    }
    for (auto& e : top) heap.push(e);
    if (top.empty()) return py::make_tuple(-1, -1, -1, 0, 0.0);
    // `top` is already in (F desc, a, b, h<v) order: it is the contract's top-k.
    double f_max = (double)top[0].f;
    size_t best = 0;
    double best_p = -1.0;
    for (size_t i = 0; i < top.size(); ++i) {
      Key k = top[i].k;
      i64 a = key_a(k), b = key_b(k);
      i64 c = a == b ? get(a, a, H_DIR) + get(a, a, V_DIR)
                     : get(a, b, H_DIR) + get(a, b, V_DIR) + get(b, a, H_DIR) + get(b, a, V_DIR);
      double f = (double)top[i].f;
      double p = f / f_max + alpha * (f / (double)c);
      // ties: F desc, then (a, b, d) asc — which is the order of `top`, so strict > keeps the first
      if (p > best_p) {
        best_p = p;
        best = i;
      }
    }
    Key k = top[best].k;
    return py::make_tuple(key_a(k), key_b(k), key_d(k), top[best].f, best_p);
  }

  size_t num_pairs() const { return F.size(); }
  size_t heap_size() const { return heap.size(); }
};

// ----------------------------------------------------------------------------- encode / decode

struct Encoder {
  Shapes shapes;
  std::unordered_map<Key, i32> rank;  // (a, b, d) -> merge index
  std::vector<std::tuple<i64, i64, int>> merges;
  i32 K;

  Encoder(i32 codebook_size, std::vector<std::tuple<i64, i64, int>> merges_) : merges(std::move(merges_)), K(codebook_size) {
    shapes.h.assign(K, 1);
    shapes.w.assign(K, 1);
    for (size_t i = 0; i < merges.size(); ++i) {
      auto [a, b, d] = merges[i];
      if (a < 0 || b < 0 || a >= K + (i64)i || b >= K + (i64)i) throw std::invalid_argument("merge refers to an id not yet created");
      rank[make_key(a, b, d)] = (i32)i;
      i32 mh = d == H_DIR ? shapes.h[a] : shapes.h[a] + shapes.h[b];
      i32 mw = d == H_DIR ? shapes.w[a] + shapes.w[b] : shapes.w[a];
      check_side(mh, mw);
      shapes.add(mh, mw);
    }
  }

  // -> tile ids in raster order of anchors, and the final anchor map if wanted.
  std::vector<i32> encode_one(const i32* grid, i32 H, i32 W, std::vector<i32>* anchor_map = nullptr) const {
    Tiling<i32> t;
    t.shapes = &shapes;
    t.tile.assign(grid, grid + (i64)H * W);
    for (i32 v : t.tile)
      if (v < 0 || v >= K) throw std::invalid_argument("grid code outside [0, codebook_size)");
    t.offset = {0, (i64)H * W};
    t.H = {H};
    t.W = {W};
    t.back.assign(t.tile.size(), 0);
    using E = std::pair<i32, i64>;  // (rank, anchor of first tile)
    std::priority_queue<E, std::vector<E>, std::greater<E>> pq;
    auto push_pairs_of = [&](i64 p, bool both_sides) {
      for (int d = 0; d < 2; ++d) {
        i64 q = t.next(p, d, 0);
        if (q >= 0) {
          auto it = rank.find(make_key(t.tile[p], t.tile[q], d));
          if (it != rank.end()) pq.push({it->second, p});
        }
        if (both_sides) {
          i64 o = t.prev(p, d, 0);
          if (o >= 0) {
            auto it = rank.find(make_key(t.tile[o], t.tile[p], d));
            if (it != rank.end()) pq.push({it->second, o});
          }
        }
      }
    };
    for (i64 p = 0; p < (i64)t.tile.size(); ++p) push_pairs_of(p, false);
    std::vector<i64> batch;
    while (!pq.empty()) {
      i32 r = pq.top().first;
      batch.clear();
      while (!pq.empty() && pq.top().first == r) {
        batch.push_back(pq.top().second);
        pq.pop();
      }
      std::sort(batch.begin(), batch.end());
      batch.erase(std::unique(batch.begin(), batch.end()), batch.end());
      auto [a, b, d] = merges[r];
      i32 new_id = K + r;
      std::vector<i64> created;
      for (i64 p : batch) {  // the pass, in raster order of anchors
        if (t.tile[p] != a) continue;
        i64 q = t.next(p, d, 0);
        if (q < 0 || t.tile[q] != b) continue;
        t.merge(p, q, new_id, 0);
        created.push_back(p);
      }
      for (i64 p : created)
        if (t.tile[p] == new_id) push_pairs_of(p, true);
    }
    std::vector<i32> out;
    for (i32 v : t.tile)
      if (v >= 0) out.push_back(v);
    if (anchor_map) *anchor_map = t.tile;
    return out;
  }

  py::array_t<i32> encode(py::array_t<i32, py::array::c_style | py::array::forcecast> grid) const {
    if (grid.ndim() != 2) throw std::invalid_argument("grid must be 2-D");
    std::vector<i32> out;
    {
      py::gil_scoped_release nogil;
      out = encode_one(grid.data(), (i32)grid.shape(0), (i32)grid.shape(1));
    }
    py::array_t<i32> arr(out.size());
    std::copy(out.begin(), out.end(), arr.mutable_data());
    return arr;
  }

  // Many grids of one shape (B, H, W) -> (flat tokens, lengths (B,)).
  std::pair<py::array_t<i32>, py::array_t<i64>> encode_batch(py::array_t<i32, py::array::c_style | py::array::forcecast> grids) const {
    if (grids.ndim() != 3) throw std::invalid_argument("grids must be (B, H, W)");
    i64 B = grids.shape(0);
    i32 H = (i32)grids.shape(1), W = (i32)grids.shape(2);
    std::vector<i32> flat;
    std::vector<i64> lengths(B);
    {
      py::gil_scoped_release nogil;
      for (i64 i = 0; i < B; ++i) {
        auto out = encode_one(grids.data() + i * (i64)H * W, H, W);
        lengths[i] = (i64)out.size();
        flat.insert(flat.end(), out.begin(), out.end());
      }
    }
    py::array_t<i32> f(flat.size());
    std::copy(flat.begin(), flat.end(), f.mutable_data());
    py::array_t<i64> l(B);
    std::copy(lengths.begin(), lengths.end(), l.mutable_data());
    return {f, l};
  }

  // Greedy raster decode: each tile goes to the first free cell. Raises if tokens do not tile H x W exactly.
  py::array_t<i32> decode(py::array_t<i32, py::array::c_style | py::array::forcecast> tokens, i32 H, i32 W) const {
    std::vector<i32> grid((i64)H * W, -1);
    build_base();
    const i32* tk = tokens.data();
    i64 cursor = 0;
    for (py::ssize_t i = 0; i < tokens.size(); ++i) {
      i32 id = tk[i];
      if (id < 0 || id >= (i32)shapes.h.size()) throw std::invalid_argument("token id outside the vocabulary");
      while (cursor < (i64)grid.size() && grid[cursor] >= 0) ++cursor;
      if (cursor >= (i64)grid.size()) throw std::invalid_argument("more tiles than the grid holds");
      i32 r = (i32)(cursor / W), c = (i32)(cursor % W);
      i32 h = shapes.h[id], w = shapes.w[id];
      if (r + h > H || c + w > W) throw std::invalid_argument("tile does not fit at the next free cell");
      const i32* codes = base_flat_.data() + base_off_[id];
      for (i32 dr = 0; dr < h; ++dr)
        for (i32 dc = 0; dc < w; ++dc) {
          i64 cell = (i64)(r + dr) * W + c + dc;
          if (grid[cell] >= 0) throw std::invalid_argument("tile overlaps an earlier tile");
          grid[cell] = codes[dr * w + dc];
        }
    }
    for (i32 v : grid)
      if (v < 0) throw std::invalid_argument("tokens do not cover the grid");
    py::array_t<i32> out({H, W});
    std::copy(grid.begin(), grid.end(), out.mutable_data());
    return out;
  }

  // Base codes of every id, row-major within its tile (memoised on first use).
  mutable std::vector<i32> base_flat_;
  mutable std::vector<i64> base_off_;
  void build_base() const {
    if (!base_off_.empty()) return;
    size_t n = shapes.h.size();
    base_off_.resize(n + 1);
    base_off_[0] = 0;
    for (size_t i = 0; i < n; ++i) base_off_[i + 1] = base_off_[i] + (i64)shapes.h[i] * shapes.w[i];
    base_flat_.resize(base_off_[n]);
    for (i32 i = 0; i < K; ++i) base_flat_[i] = i;
    // merges in order: an id's children always precede it
    for (size_t r = 0; r < merges.size(); ++r) {
      auto [a, b, d] = merges[r];
      i64 id = K + (i64)r;
      i32 h = shapes.h[id], w = shapes.w[id];
      i32* dst = base_flat_.data() + base_off_[id];
      i32 ha = shapes.h[a], wa = shapes.w[a], hb = shapes.h[b], wb = shapes.w[b];
      const i32* sa = base_flat_.data() + base_off_[a];
      const i32* sb = base_flat_.data() + base_off_[b];
      for (i32 rr = 0; rr < h; ++rr)
        for (i32 cc = 0; cc < w; ++cc) {
          i32 v;
          if (d == H_DIR) v = cc < wa ? sa[rr * wa + cc] : sb[rr * wb + (cc - wa)];
          else v = rr < ha ? sa[rr * wa + cc] : sb[(rr - ha) * wb + cc];
          dst[rr * w + cc] = v;
        }
    }
  }

  py::array_t<i32> tile_codes(i32 id) const {
    build_base();
    if (id < 0 || id >= (i32)shapes.h.size()) throw std::invalid_argument("id outside the vocabulary");
    py::array_t<i32> out({shapes.h[id], shapes.w[id]});
    std::copy(base_flat_.begin() + base_off_[id], base_flat_.begin() + base_off_[id + 1], out.mutable_data());
    return out;
  }
};

template <typename T>
static void bind_shard(py::module_& m, const char* name) {
  py::class_<Shard<T>>(m, name)
      .def(py::init<py::array_t<i32, py::array::c_style | py::array::forcecast>, std::vector<i64>, std::vector<i32>,
                    std::vector<i32>, std::vector<i32>, std::vector<i32>>(),
           py::arg("tiles"), py::arg("offsets"), py::arg("heights"), py::arg("widths"), py::arg("shape_h"), py::arg("shape_w"))
      .def("count", &Shard<T>::count)
      .def("apply", &Shard<T>::apply)
      .def("tiles", &Shard<T>::tiles)
      .def("num_tiles", &Shard<T>::num_tiles)
      .def("num_cells", &Shard<T>::num_cells)
      .def("index_entries", &Shard<T>::index_entries)
      .def("num_keys", &Shard<T>::num_keys)
      .def("compactions", &Shard<T>::compactions)
      .def_readwrite("compact_min", &Shard<T>::compact_min)
      .def_readonly_static("max_id", &TileIds<T>::max_id);
}

PYBIND11_MODULE(_core, m) {
  m.doc() = "Compiled core of Tessera's 2-D visual BPE";
  m.def("make_key", &make_key);
  bind_shard<i32>(m, "Shard");
  bind_shard<uint16_t>(m, "Shard16");
  py::class_<Table>(m, "Table")
      .def(py::init<std::vector<i32>, std::vector<i32>, i32, i32, i64>(), py::arg("shape_h"), py::arg("shape_w"),
           py::arg("max_h"), py::arg("max_w"), py::arg("min_frequency"))
      .def("add", &Table::add)
      .def("add_shape", &Table::add_shape)
      .def("get", &Table::get)
      .def("choose", &Table::choose)
      .def("num_pairs", &Table::num_pairs)
      .def("heap_size", &Table::heap_size);
  py::class_<Encoder>(m, "Encoder")
      .def(py::init<i32, std::vector<std::tuple<i64, i64, int>>>())
      .def("encode", &Encoder::encode)
      .def("encode_batch", &Encoder::encode_batch)
      .def("decode", &Encoder::decode)
      .def("tile_codes", &Encoder::tile_codes);
}
