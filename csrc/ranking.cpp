// Ranking metrics over ragged groups of candidates (docs/metrics.md).
//
// Candidates are ranked by score descending, irrelevant before relevant on equal scores, then
// input order. Groups of up to kSmallGroup candidates count each candidate's rank over all pairs,
// kLanes groups of equal size at a time in a structure-of-arrays layout (branch-free, SIMD over
// groups, AVX2 where the CPU has it); larger groups are sorted into per-thread scratch space and
// read in one pass. The authors' conventions (docs/metrics.md) sort every group, ties in input
// order. Groups are processed in fixed-size blocks pulled by worker threads with the GIL
// released; block sums are added in block order, so results do not depend on the thread count.
// An exception in any thread (out of memory) reaches Python once all threads have finished; a
// thread that cannot be started leaves its share to the others.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kBlockGroups = 2048;
constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();
// Groups up to this size are ranked by branch-free rank counting in fixed-size arrays; larger
// groups are sorted in per-thread scratch space.
constexpr int kSmallGroup = 16;

enum class GroupError : int { kNone = 0, kNaN = 1, kInf = 2, kNoRelevant = 3 };

struct Candidate {
  double score;
  uint8_t relevant;
  int64_t index;
};

// The order of docs/metrics.md: ties are broken pessimistically (irrelevant first), then by
// input order.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  if (a.relevant != b.relevant) return a.relevant < b.relevant;
  return a.index < b.index;
}

// The authors' order (docs/metrics.md): ties in input order.
inline bool ranks_before_in_input_order(const Candidate& a, const Candidate& b) {
  if (a.score != b.score) return a.score > b.score;
  return a.index < b.index;
}

// Which definitions of docs/metrics.md: the paper's text (default) or the authors' code.
enum class Convention : int { kPaper = 0, kAuthors = 1 };

struct GroupMetrics {
  uint8_t top_relevant = 0;     // MP@1 term
  uint8_t ranked_correctly = 0; // ranking-accuracy term
  uint8_t misranked = 0;        // has a position whose relevance differs from the parallel list
  double reciprocal_rank = 0.0;
  double wpr = 0.0;
  double average_precision = 0.0;
};

struct Sums {
  double top_relevant = 0.0, ranked_correctly = 0.0, reciprocal_rank = 0.0, wpr = 0.0,
         average_precision = 0.0, misranked = 0.0;
  void add(const GroupMetrics& m) {
    top_relevant += m.top_relevant;
    ranked_correctly += m.ranked_correctly;
    reciprocal_rank += m.reciprocal_rank;
    wpr += m.wpr;
    average_precision += m.average_precision;
    misranked += m.misranked;
  }
};

// The vector v emptied and refilled with exactly n value-initialised elements (resizing an
// empty vector does not round the capacity up); the old buffer is freed first.
template <typename T>
void reallocate(std::vector<T>& v, int64_t n) {
  std::vector<T>().swap(v);
  v.resize(static_cast<size_t>(n));
}

// Per-thread buffers of the sorting path, grown to the largest group that this thread sorts (a
// thread that sorts none allocates none of them): no allocation per group.
struct Scratch {
  std::vector<Candidate> candidates;
  std::vector<double> ranked_scores, parallel;
  std::vector<uint8_t> ranked_relevant;
  std::vector<int64_t> order;  // a block's small groups, by size
  static constexpr int64_t kBytesPerCandidate =
      sizeof(Candidate) + 2 * sizeof(double) + sizeof(uint8_t);
  Scratch() : order(kBlockGroups) {}
  // Room for a group of n candidates.
  void fit(int64_t n) {
    if (static_cast<int64_t>(candidates.size()) >= n) return;
    reallocate(candidates, n);
    reallocate(ranked_scores, n);
    reallocate(parallel, n);
    reallocate(ranked_relevant, n);
  }
};

// A group's error from what the scan of its candidates found.
[[gnu::always_inline]] inline GroupError group_error(bool nan, bool inf, int64_t num_relevant) {
  if (nan) return GroupError::kNaN;
  if (inf) return GroupError::kInf;
  return num_relevant == 0 ? GroupError::kNoRelevant : GroupError::kNone;
}

// Reads every score and relevance flag of a group exactly once (a caller writing into its arrays
// meanwhile cannot make the group inconsistent), handing each to store(j, score, relevant).
// Returns the group's error, if any: a NaN, else an infinite score, else no relevant candidate.
template <typename Score, typename Store>
GroupError load_group(const Score* score, const uint8_t* relevant, int64_t n, Store&& store,
                      int64_t& num_relevant) {
  bool nan = false, inf = false;
  num_relevant = 0;
  for (int64_t j = 0; j < n; ++j) {
    const Score v = score[j];
    const uint8_t r = relevant[j] != 0;
    store(j, v, r);
    nan |= std::isnan(v);
    inf |= std::isinf(v);
    num_relevant += r;
  }
  return group_error(nan, inf, num_relevant);
}

// Every metric from the group in rank order (scores and relevance by position), branch-free (the
// relevance pattern is data and would defeat branch prediction); `parallel` has room for n. The
// authors' convention sums WPR's gaps instead of averaging them, and takes 1 / rank in place of
// precision at each relevant position (docs/metrics.md).
void metrics_from_ranking(const double* ranked_score, const uint8_t* ranked_relevant, int64_t n,
                          int64_t num_relevant, double* parallel, Convention convention,
                          GroupMetrics& out) {
  // The parallel list of WPR (docs/metrics.md): relevant first, each part in ranked order.
  int64_t nr = 0, ni = num_relevant;
  for (int64_t p = 0; p < n; ++p) {
    const bool r = ranked_relevant[p];
    parallel[r ? nr : ni] = ranked_score[p];
    nr += r;
    ni += !r;
  }

  const bool authors = convention == Convention::kAuthors;
  int64_t hits = 0, mismatches = 0, first_hit = n;
  double precision_sum = 0.0, wpr_sum = 0.0;
  for (int64_t p = 0; p < n; ++p) {
    const bool r = ranked_relevant[p];
    first_hit = (r && hits == 0) ? p : first_hit;
    hits += r;
    // Selections as integer factors, not branches: precision (the authors: 1) over the rank at a
    // relevant position, score gap at a mis-ranked one.
    const int64_t numerator = r ? (authors ? 1 : hits) : 0;
    precision_sum += static_cast<double>(numerator) / static_cast<double>(p + 1);
    const bool mismatch = r != (p < num_relevant);
    wpr_sum += static_cast<double>(mismatch) * std::fabs(ranked_score[p] - parallel[p]);
    mismatches += mismatch;
  }
  out.top_relevant = ranked_relevant[0];
  out.reciprocal_rank = 1.0 / static_cast<double>(first_hit + 1);
  out.ranked_correctly = mismatches == 0;
  out.misranked = mismatches > 0;
  out.wpr = (mismatches > 0 && !authors) ? wpr_sum / static_cast<double>(mismatches) : wpr_sum;
  out.average_precision = precision_sum / static_cast<double>(num_relevant);
}

// Up to kLanes groups of at most kSmallGroup candidates each, ranked without sorting. Structure
// of arrays: candidate j of lane l sits at [j][l], and every operation below acts on all lanes at
// once as GCC vector types (8-lane SIMD over groups, no per-group branches). For each candidate j
// its 0-based rank `before` and the relevant candidates ranked before it are counted over all
// candidates i (branch-free rank counting). Lanes beyond `num_lanes`, and candidates beyond a
// group's size, are masked off. The values equal the sorting path's up to the order of the
// floating-point sums (AP here is even exact: one rounding of an integer ratio).
constexpr int kLanes = 8;

template <typename T>
using Lanes [[gnu::vector_size(kLanes * sizeof(T))]] = T;
template <typename T>
using Lanes4 [[gnu::vector_size(4 * sizeof(T))]] = T;

// kLanes doubles (and masks selecting them) as two four-lane vectors, one AVX register each:
// GCC moves eight-lane double vectors through general registers on AVX2.
using Double4 = Lanes4<double>;
using Mask4 = Lanes4<int64_t>;
struct Doubles {
  Double4 half[2];
};
struct Masks {
  Mask4 half[2];
};
static_assert(kLanes == 8, "Doubles holds kLanes values");

// The kLanes values of v, converted to double.
template <typename V>
[[gnu::always_inline]] inline Doubles as_doubles(const V& v) {
  return {{__builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), Double4),
           __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), Double4)}};
}

// The kLanes masks (-1 or 0) of v, widened to select doubles.
template <typename V>
[[gnu::always_inline]] inline Masks as_masks(const V& v) {
  return {{__builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), Mask4),
           __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), Mask4)}};
}

// The bits of `from` as a To (std::bit_cast, C++20).
template <typename To, typename From>
[[gnu::always_inline]] inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// The vector {table[index[0]], table[index[1]], ...} of a 2 * kLanes entry table held as two
// vectors (low: entries 0..kLanes-1), indices in range.
template <typename V>
[[gnu::always_inline]] inline V lookup(const V& low, const V& high, const V& index) {
#if defined(__GNUC__) && !defined(__clang__)
  return __builtin_shuffle(low, high, index);  // vpermd / vpermq and a blend on AVX2
#else
  V out;
  for (int l = 0; l < kLanes; ++l)
    out[l] = index[l] < kLanes ? low[index[l]] : high[index[l] - kLanes];
  return out;
#endif
}

// The vector {values[at[0]], values[at[1]], ...}, assembled in registers.
template <typename V, typename T, size_t... L>
[[gnu::always_inline]] inline V load_lanes(const T* values, const int64_t* at,
                                           std::index_sequence<L...>) {
  return V{static_cast<std::remove_reference_t<decltype(V{}[0])>>(values[at[L]])...};
}

// Eight 32-bit lanes (one AVX register): counts, ranks and masks of the small-group path, for
// either score type.
using Key = int32_t;
using KeyV = Lanes<Key>;

// Row j of kLanes scores (one per lane) as ranking keys and as the 32-bit words of their values,
// for the small-group path; `above` and `equal` are lane masks (-1 true, 0 false) comparing two
// rows' scores.
template <typename Score>
struct ScoreRows;

// float scores compare as they are, one word each.
template <>
struct ScoreRows<float> {
  static constexpr int kWords = 1;
  Lanes<float> key[kSmallGroup];
  KeyV word[kWords][kSmallGroup];
  // Reads row j from score[at[l]]; adds NaN and non-finite flags of the in_group lanes.
  [[gnu::always_inline]] void load(int j, const float* score, const int64_t* at, KeyV in_group,
                                   KeyV& nan, KeyV& non_finite) {
    const Lanes<float> v =
        load_lanes<Lanes<float>>(score, at, std::make_index_sequence<kLanes>{});
    key[j] = v;
    word[0][j] = bit_cast<KeyV>(v);
    nan |= in_group & (v != v);
    non_finite |= in_group & ((v - v) != (v - v));  // v - v: 0, or NaN
  }
  [[gnu::always_inline]] KeyV above(int i, int j) const { return key[i] > key[j]; }
  [[gnu::always_inline]] KeyV equal(int i, int j) const { return key[i] == key[j]; }
};

// double scores compare as an order-preserving 64-bit integer key in two 32-bit halves (signed
// high half, then low half), so that every operation stays in eight 32-bit lanes: the same
// comparisons as on the doubles, exactly. Their values are kept as two words (low, high).
template <>
struct ScoreRows<double> {
  static constexpr int kWords = 2;
  KeyV high[kSmallGroup], low[kSmallGroup];
  KeyV word[kWords][kSmallGroup];
  [[gnu::always_inline]] void load(int j, const double* score, const int64_t* at, KeyV in_group,
                                   KeyV& nan, KeyV& non_finite) {
    uint64_t bits[kLanes];
    for (int l = 0; l < kLanes; ++l) std::memcpy(&bits[l], score + at[l], sizeof(double));
    KeyV lo, hi;
    for (int l = 0; l < kLanes; ++l) {
      lo[l] = static_cast<Key>(static_cast<uint32_t>(bits[l]));
      hi[l] = static_cast<Key>(static_cast<uint32_t>(bits[l] >> 32));
    }
    word[0][j] = lo;
    word[1][j] = hi;
    constexpr Key kExponent = 0x7FF00000, kMagnitude = 0x7FFFFFFF;
    const KeyV exponent_all_ones = (hi & kExponent) == kExponent;
    nan |= in_group & exponent_all_ones & (((hi & 0x000FFFFF) | lo) != 0);
    non_finite |= in_group & exponent_all_ones;
    // -0.0 ties with +0.0: zeros lose their sign. Then negative values get their magnitude bits
    // flipped, so that signed integer order is the order of the values; the low half is
    // compared unsigned, as signed after flipping its top bit.
    const KeyV h = hi & ~(((hi & kMagnitude) | lo) == 0);
    const KeyV negative = h >> 31;
    high[j] = h ^ (negative & kMagnitude);
    low[j] = lo ^ negative ^ std::numeric_limits<Key>::min();
  }
  [[gnu::always_inline]] KeyV above(int i, int j) const {
    return (high[i] > high[j]) | ((high[i] == high[j]) & (low[i] > low[j]));
  }
  [[gnu::always_inline]] KeyV equal(int i, int j) const {
    return (high[i] == high[j]) & (low[i] == low[j]);
  }
};

// The kLanes values held as ScoreRows words, as doubles.
[[gnu::always_inline]] inline Doubles values_of(const KeyV (&word)[1]) {
  return as_doubles(bit_cast<Lanes<float>>(word[0]));
}
[[gnu::always_inline]] inline Doubles values_of(const KeyV (&word)[2]) {
  return {{bit_cast<Double4>(__builtin_shufflevector(word[0], word[1], 0, 8, 1, 9, 2, 10, 3, 11)),
           bit_cast<Double4>(
               __builtin_shufflevector(word[0], word[1], 4, 12, 5, 13, 6, 14, 7, 15))}};
}

// Lane l holds the group of count[l] candidates from begin[l]; lanes >= num_lanes hold none.
template <typename Score>
[[gnu::always_inline]] inline void evaluate_small_lanes(const Score* score,
                                                       const uint8_t* relevant,
                                                       const int64_t* begin, const int64_t* count,
                                                       int num_lanes, GroupMetrics* out,
                                                       GroupError* error) {
  constexpr int kW = kSmallGroup;
  constexpr int kRelevantShift = 8;

  KeyV size{};
  int64_t first[kLanes], last[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const bool active = l < num_lanes;
    size[l] = active ? static_cast<Key>(count[l]) : 0;
    first[l] = begin[active ? l : 0];
    last[l] = active ? count[l] - 1 : 0;  // lanes without a group read the first lane's first
  }
  Key rows = 0;
  for (int l = 0; l < kLanes; ++l) rows = std::max(rows, size[l]);
  // Each candidate is read once into owned storage (the caller may write meanwhile), lanes
  // assembled in registers. Padding (rows beyond a lane's group) repeats the group's last
  // candidate with weight 0: it precedes no candidate and is masked out of every result.
  ScoreRows<Score> s;
  KeyV rel[kW], weight[kW];
  KeyV nan{}, non_finite{}, num_relevant{};
  for (Key j = 0; j < rows; ++j) {
    int64_t at[kLanes];  // clamped into the group
    for (int l = 0; l < kLanes; ++l) at[l] = first[l] + std::min<int64_t>(j, last[l]);
    const KeyV in_group = (KeyV{} + j) < size;
    s.load(j, score, at, in_group, nan, non_finite);
    rel[j] = (load_lanes<KeyV>(relevant, at, std::make_index_sequence<kLanes>{}) != 0) &
             in_group & 1;
    weight[j] = in_group & (1 + (rel[j] << kRelevantShift));
    num_relevant += rel[j];
  }

  KeyV rank[kW], parallel_pos[kW], mismatch[kW];  // masks are -1 (true) or 0
  KeyV first_hit = KeyV{} + kW, mismatches{};
  // AP's sum of hits / rank as an exact integer numerator over kLcm, the least common multiple
  // of the ranks 1..16: hits <= rank, so the sum is at most 16 * kLcm < 2^31. kLcm / rank is
  // looked up by lane.
  constexpr Key kLcm = 720720;
  const KeyV lcm_over_rank_low = {kLcm / 1, kLcm / 2, kLcm / 3, kLcm / 4,
                                  kLcm / 5, kLcm / 6, kLcm / 7, kLcm / 8};
  const KeyV lcm_over_rank_high = {kLcm / 9,  kLcm / 10, kLcm / 11, kLcm / 12,
                                   kLcm / 13, kLcm / 14, kLcm / 15, kLcm / 16};
  static_assert(kSmallGroup == 2 * kLanes, "two lookup vectors cover the ranks 1..kSmallGroup");
  KeyV precision_numerator{};
  // One sum counts both: preceding candidates in the low bits, preceding relevant ones from bit
  // kRelevantShift up. Each pair i < j is compared once: exactly one of the two ranks first. On
  // equal scores i (earlier in the input) ranks first unless it is relevant and j is not.
  KeyV counts[kW];
  for (Key j = 0; j < rows; ++j) {
    KeyV counts_j{};  // a register: a sum through memory would wait on its own stores
    for (Key i = 0; i < j; ++i) {
      const KeyV i_first = s.above(i, j) | (s.equal(i, j) & ~(rel[i] > rel[j]));
      counts_j += i_first & weight[i];
      counts[i] += ~i_first & weight[j];
    }
    counts[j] = counts_j;
  }
  for (Key j = 0; j < rows; ++j) {
    const KeyV before = counts[j] & ((Key(1) << kRelevantShift) - 1);
    const KeyV relevant_before = counts[j] >> kRelevantShift;
    const KeyV in_group = (KeyV{} + j) < size, is_relevant = rel[j] != 0;
    rank[j] = before;
    // The parallel list of WPR (docs/metrics.md): relevant first, each part in ranked order;
    // padding gets position -1.
    parallel_pos[j] = in_group ? (is_relevant ? relevant_before
                                              : num_relevant + before - relevant_before)
                               : KeyV{} - 1;
    mismatch[j] = in_group & (is_relevant != (before < num_relevant));
    mismatches -= mismatch[j];
    const KeyV hit_rank = is_relevant ? before : KeyV{} + kW;
    first_hit = hit_rank < first_hit ? hit_rank : first_hit;
    // hits / rank at a relevant candidate (AP), as hits * (kLcm / rank)
    precision_numerator += (is_relevant & (relevant_before + 1)) *
                           lookup(lcm_over_rank_low, lcm_over_rank_high, before);
  }
  // The parallel list's entry at each candidate's rank, found by matching positions (exactly
  // one candidate of the group holds each position); each gap is taken on its own, so that
  // scores of very different magnitudes cannot cancel.
  constexpr int kWords = ScoreRows<Score>::kWords;
  Doubles wpr_sum{};
  for (Key j = 0; j < rows; ++j) {
    // A bitwise or of the one match and zeros: one-cycle integer ops, where a float sum would
    // chain additions.
    KeyV at_rank_words[kWords] = {};
    for (Key k = 0; k < rows; ++k) {
      const KeyV match = parallel_pos[k] == rank[j];
      for (int w = 0; w < kWords; ++w) at_rank_words[w] |= match & s.word[w][k];
    }
    KeyV own_words[kWords];
    for (int w = 0; w < kWords; ++w) own_words[w] = s.word[w][j];
    const Doubles own = values_of(own_words), at_rank = values_of(at_rank_words);
    const Masks counted = as_masks(mismatch[j]);
    for (int h = 0; h < 2; ++h) {
      // |gap| where mismatched, else 0, as bit operations: a select on doubles would branch
      const Mask4 keep = counted.half[h] & std::numeric_limits<int64_t>::max();
      wpr_sum.half[h] += bit_cast<Double4>(bit_cast<Mask4>(own.half[h] - at_rank.half[h]) & keep);
    }
  }
  const Doubles first_rank = as_doubles(first_hit + 1), relevant_count = as_doubles(num_relevant),
                mismatched = as_doubles(mismatches > 0 ? mismatches : KeyV{} + 1),
                numerator = as_doubles(precision_numerator);
  Doubles reciprocal_rank, wpr, average_precision;
  for (int h = 0; h < 2; ++h) {
    reciprocal_rank.half[h] = 1.0 / first_rank.half[h];
    // mismatches is 0 or at least 1 and wpr_sum 0 where it is 0: dividing by max(mismatches, 1)
    wpr.half[h] = wpr_sum.half[h] / mismatched.half[h];
    average_precision.half[h] = numerator.half[h] / (relevant_count.half[h] * kLcm);
  }
  for (int l = 0; l < num_lanes; ++l) {
    error[l] = group_error(nan[l], non_finite[l], num_relevant[l]);
    GroupMetrics& m = out[l];
    m.top_relevant = first_hit[l] == 0;
    m.reciprocal_rank = reciprocal_rank.half[l / 4][l % 4];
    m.ranked_correctly = mismatches[l] == 0;
    m.misranked = mismatches[l] > 0;
    m.wpr = wpr.half[l / 4][l % 4];
    m.average_precision = average_precision.half[l / 4][l % 4];
  }
}

// Any group size: sort into per-thread scratch space, in the order of the convention.
template <typename Score>
GroupError evaluate_sorted(const Score* score, const uint8_t* relevant, int64_t n,
                           Convention convention, Scratch& s, GroupMetrics& out) {
  s.fit(n);
  int64_t num_relevant;
  const GroupError err = load_group(
      score, relevant, n,
      [&](int64_t j, Score v, uint8_t r) {
        s.candidates[j] = Candidate{static_cast<double>(v), r, j};
      },
      num_relevant);
  if (err != GroupError::kNone) return err;
  std::sort(s.candidates.begin(), s.candidates.begin() + n,
            convention == Convention::kAuthors ? ranks_before_in_input_order : ranks_before);
  for (int64_t p = 0; p < n; ++p) {
    s.ranked_scores[p] = s.candidates[p].score;
    s.ranked_relevant[p] = s.candidates[p].relevant;
  }
  metrics_from_ranking(s.ranked_scores.data(), s.ranked_relevant.data(), n, num_relevant,
                       s.parallel.data(), convention, out);
  return GroupError::kNone;
}

struct PerGroupOut {
  uint8_t* top_relevant = nullptr;
  uint8_t* ranked_correctly = nullptr;
  uint8_t* misranked = nullptr;
  double* reciprocal_rank = nullptr;
  double* wpr = nullptr;
  double* average_precision = nullptr;
};

struct BlockResult {
  Sums sums;
  int64_t error_group = kNoError;
  GroupError error = GroupError::kNone;
};

// Groups [g0, g1): groups of more than kSmallGroup candidates (under the authors' convention,
// every group) one at a time through evaluate_sorted, in order; the others bucketed by size (a
// counting sort into scratch.order), kLanes at a time through evaluate_small_lanes, so that lanes
// rarely hold padding. The sums' order depends only on the block's groups. A bad group makes the
// block report the first one.
template <typename Score>
[[gnu::always_inline]] inline BlockResult evaluate_block_body(
    const Score* score, const uint8_t* relevant, const int64_t* offsets, int64_t g0, int64_t g1,
    Convention convention, Scratch& scratch, const PerGroupOut& per_group) {
  BlockResult block;
  auto record = [&](int64_t g, GroupError err, const GroupMetrics& m) {
    if (err != GroupError::kNone) {
      if (g < block.error_group) {
        block.error = err;
        block.error_group = g;
      }
      return;
    }
    block.sums.add(m);
    if (per_group.reciprocal_rank != nullptr) {
      per_group.top_relevant[g] = m.top_relevant;
      per_group.ranked_correctly[g] = m.ranked_correctly;
      per_group.misranked[g] = m.misranked;
      per_group.reciprocal_rank[g] = m.reciprocal_rank;
      per_group.wpr[g] = m.wpr;
      per_group.average_precision[g] = m.average_precision;
    }
  };

  int64_t bucket_end[kSmallGroup + 1] = {};  // after counting: bucket n ends at bucket_end[n]
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    if (n > kSmallGroup || convention == Convention::kAuthors) {
      GroupMetrics m;
      const GroupError err = evaluate_sorted(score + offsets[g], relevant + offsets[g], n,
                                             convention, scratch, m);
      record(g, err, m);
    } else {
      ++bucket_end[n];
    }
  }
  for (int n = 1; n <= kSmallGroup; ++n) bucket_end[n] += bucket_end[n - 1];
  const int64_t small_groups = bucket_end[kSmallGroup];
  for (int64_t g = g1 - 1; g >= g0 && small_groups > 0; --g) {
    const int64_t n = offsets[g + 1] - offsets[g];
    if (n <= kSmallGroup) scratch.order[--bucket_end[n]] = g;
  }

  GroupMetrics m[kLanes];
  GroupError err[kLanes];
  int64_t begin[kLanes], count[kLanes];
  for (int64_t k = 0; k < small_groups; k += kLanes) {
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, small_groups - k));
    for (int l = 0; l < lanes; ++l) {
      const int64_t g = scratch.order[k + l];
      begin[l] = offsets[g];
      count[l] = offsets[g + 1] - offsets[g];
    }
    evaluate_small_lanes(score, relevant, begin, count, lanes, m, err);
    for (int l = 0; l < lanes; ++l) record(scratch.order[k + l], err[l], m[l]);
  }
  return block;
}

// evaluate_block_body compiled for the baseline ISA and, with GCC/Clang on x86-64, also for AVX2
// (evaluate_small_lanes' loops over lanes become 8-lane vectors; it is always inlined so that it
// is compiled for the caller's ISA), chosen at run time. Same operations in the same order:
// identical results.
template <typename Score>
BlockResult evaluate_block_baseline(const Score* score, const uint8_t* relevant,
                                    const int64_t* offsets, int64_t g0, int64_t g1,
                                    Convention convention, Scratch& scratch,
                                    const PerGroupOut& per_group) {
  return evaluate_block_body(score, relevant, offsets, g0, g1, convention, scratch, per_group);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Score>
[[gnu::target("avx2")]] BlockResult evaluate_block_avx2(
    const Score* score, const uint8_t* relevant, const int64_t* offsets, int64_t g0, int64_t g1,
    Convention convention, Scratch& scratch, const PerGroupOut& per_group) {
  return evaluate_block_body(score, relevant, offsets, g0, g1, convention, scratch, per_group);
}
#endif

template <typename Score>
BlockResult evaluate_block(const Score* score, const uint8_t* relevant, const int64_t* offsets,
                           int64_t g0, int64_t g1, Convention convention, Scratch& scratch,
                           const PerGroupOut& per_group) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2)
    return evaluate_block_avx2(score, relevant, offsets, g0, g1, convention, scratch, per_group);
#endif
  return evaluate_block_baseline(score, relevant, offsets, g0, g1, convention, scratch,
                                 per_group);
}

// Runs work() on up to `threads` threads, the calling one included, and returns once every one
// has finished. A thread that cannot be created is done without: work() pulls its share from a
// common queue, so the others do it. The first exception thrown by any work() is rethrown here;
// `stop` is set when one throws, so that the others can finish early.
template <typename Work>
void run_on_threads(int threads, std::atomic<bool>& stop, const Work& work) {
  std::mutex error_mutex;
  std::exception_ptr error;
  auto guarded = [&]() noexcept {
    try {
      work();
    } catch (...) {
      stop.store(true);
      const std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  try {
    pool.reserve(static_cast<size_t>(std::max(threads - 1, 0)));
    for (int t = 1; t < threads; ++t) pool.emplace_back(guarded);
  } catch (const std::exception&) {
    // fewer threads (std::system_error, std::bad_alloc): the ones started share the work
  }
  guarded();
  for (std::thread& thread : pool) thread.join();
  if (error) std::rethrow_exception(error);
}

template <typename Score>
void evaluate_blocks(const Score* score, const uint8_t* relevant, const int64_t* offsets,
                     int64_t num_groups, Convention convention, const PerGroupOut& per_group,
                     std::vector<BlockResult>& blocks, int num_threads) {
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  std::atomic<int64_t> next_block{0};
  std::atomic<int64_t> first_error{kNoError};
  std::atomic<bool> stop{false};

  auto worker = [&]() {
    Scratch scratch;
    while (!stop.load(std::memory_order_relaxed)) {
      const int64_t b = next_block.fetch_add(1);
      if (b >= num_blocks) return;
      const int64_t g0 = b * kBlockGroups;
      if (g0 > first_error.load()) continue;  // a bad group was already found before this block
      const int64_t g1 = std::min(num_groups, g0 + kBlockGroups);
      // local: neighbouring blocks' results may share a cache line
      const BlockResult block =
          evaluate_block(score, relevant, offsets, g0, g1, convention, scratch, per_group);
      if (block.error != GroupError::kNone) {
        int64_t seen = first_error.load();
        while (block.error_group < seen &&
               !first_error.compare_exchange_weak(seen, block.error_group)) {
        }
      }
      blocks[b] = block;
    }
  };
  run_on_threads(static_cast<int>(std::min<int64_t>(num_threads, num_blocks)), stop, worker);
}

void require_1d_contiguous(const py::array& a, const char* name) {
  if (a.ndim() != 1) throw py::value_error(std::string(name) + " must be 1-D");
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
}

// Validates offsets (docs/ops.md, for candidates) and returns the largest group size.
int64_t check_offsets(const int64_t* offsets, int64_t num_groups, int64_t num_candidates) {
  if (offsets[0] != 0)
    throw py::value_error("offsets[0] must be 0, got " + std::to_string(offsets[0]));
  int64_t max_group = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t begin = offsets[g], end = offsets[g + 1];
    if (end <= begin)
      throw py::value_error("group " + std::to_string(g) + " has no candidates (offsets[" +
                            std::to_string(g) + "]=" + std::to_string(begin) + ", offsets[" +
                            std::to_string(g + 1) + "]=" + std::to_string(end) +
                            "); offsets must be strictly increasing");
    if (end > num_candidates)
      throw py::value_error("group " + std::to_string(g) + " ends at offsets[" +
                            std::to_string(g + 1) + "]=" + std::to_string(end) + ", beyond the " +
                            std::to_string(num_candidates) + " candidates");
    max_group = std::max(max_group, end - begin);
  }
  if (offsets[num_groups] != num_candidates)
    throw py::value_error("offsets[-1]=" + std::to_string(offsets[num_groups]) +
                          " does not match the " + std::to_string(num_candidates) +
                          " candidates");
  return max_group;
}

py::dict evaluate(const py::array& scores, const py::array& relevant, const py::array& offsets,
                  bool per_group, int num_threads, bool authors_convention) {
  require_1d_contiguous(scores, "similarity");
  require_1d_contiguous(relevant, "relevant");
  require_1d_contiguous(offsets, "offsets");
  // array_t checks compare dtypes by value (byte order included), not by object identity.
  const bool is_f32 = py::isinstance<py::array_t<float>>(scores);
  const bool is_f64 = py::isinstance<py::array_t<double>>(scores);
  if (!is_f32 && !is_f64)
    throw py::type_error("similarity must be float32 or float64 in native byte order, got " +
                         std::string(py::str(scores.dtype())));
  if (!relevant.dtype().is(py::dtype::of<bool>())) throw py::type_error("relevant must be bool");
  if (!offsets.dtype().is(py::dtype::of<int64_t>())) throw py::type_error("offsets must be int64");
  const int64_t num_candidates = scores.shape(0);
  if (relevant.shape(0) != num_candidates)
    throw py::value_error("relevant has " + std::to_string(relevant.shape(0)) +
                          " entries but similarity has " + std::to_string(num_candidates));
  if (offsets.shape(0) < 2)
    throw py::value_error("offsets must hold at least two entries (one group)");
  const int64_t num_groups = offsets.shape(0) - 1;
  if (num_threads <= 0) num_threads = std::max(1u, std::thread::hardware_concurrency());

  // An owned copy, validated and then used: the caller's offsets may change under us once the
  // GIL is released, and every read of similarity and relevant is bounded by these offsets.
  const auto* caller_offsets = static_cast<const int64_t*>(offsets.data());
  const std::vector<int64_t> off(caller_offsets, caller_offsets + num_groups + 1);
  const auto* rel = static_cast<const uint8_t*>(relevant.data());
  const int64_t max_group = check_offsets(off.data(), num_groups, num_candidates);

  py::array_t<uint8_t> top_relevant, ranked_correctly, misranked;
  py::array_t<double> reciprocal_rank, wpr, average_precision;
  PerGroupOut out;
  if (per_group) {
    top_relevant = py::array_t<uint8_t>(num_groups);
    ranked_correctly = py::array_t<uint8_t>(num_groups);
    misranked = py::array_t<uint8_t>(num_groups);
    reciprocal_rank = py::array_t<double>(num_groups);
    wpr = py::array_t<double>(num_groups);
    average_precision = py::array_t<double>(num_groups);
    out = PerGroupOut{top_relevant.mutable_data(),    ranked_correctly.mutable_data(),
                      misranked.mutable_data(),       reciprocal_rank.mutable_data(),
                      wpr.mutable_data(),             average_precision.mutable_data()};
  }

  const Convention convention = authors_convention ? Convention::kAuthors : Convention::kPaper;
  std::vector<BlockResult> blocks((num_groups + kBlockGroups - 1) / kBlockGroups);
  try {
    py::gil_scoped_release release;
    if (is_f32)
      evaluate_blocks(static_cast<const float*>(scores.data()), rel, off.data(), num_groups,
                      convention, out, blocks, num_threads);
    else
      evaluate_blocks(static_cast<const double*>(scores.data()), rel, off.data(), num_groups,
                      convention, out, blocks, num_threads);
  } catch (const std::bad_alloc&) {  // the GIL is held again here
    const int64_t mib = ((max_group * Scratch::kBytesPerCandidate) >> 20) + 1;
    PyErr_SetString(PyExc_MemoryError,
                    ("not enough memory to rank the groups (sorting the largest group, " +
                     std::to_string(max_group) + " candidates, takes about " +
                     std::to_string(mib) + " MiB)")
                        .c_str());
    throw py::error_already_set();
  }

  Sums total;
  for (const BlockResult& b : blocks) {
    if (b.error != GroupError::kNone) {
      const std::string g = std::to_string(b.error_group);
      if (b.error == GroupError::kNaN) throw py::value_error("group " + g + " has a NaN similarity");
      if (b.error == GroupError::kInf)
        throw py::value_error("group " + g + " has an infinite similarity");
      throw py::value_error("group " + g + " has no relevant candidate");
    }
    total.top_relevant += b.sums.top_relevant;
    total.ranked_correctly += b.sums.ranked_correctly;
    total.reciprocal_rank += b.sums.reciprocal_rank;
    total.wpr += b.sums.wpr;
    total.average_precision += b.sums.average_precision;
    total.misranked += b.sums.misranked;
  }

  const double n = static_cast<double>(num_groups);
  py::dict result;
  result["mp1"] = total.top_relevant / n;
  result["ranking_accuracy"] = total.ranked_correctly / n;
  result["mrr"] = total.reciprocal_rank / n;
  result["wpr"] = total.wpr / n;
  // Groups without a mis-ranked position contribute 0 to the WPR sum.
  result["wpr_misranked"] = total.misranked > 0 ? total.wpr / total.misranked : 0.0;
  result["map"] = total.average_precision / n;
  result["groups"] = num_groups;
  result["misranked_groups"] = static_cast<int64_t>(total.misranked);
  if (per_group) {
    py::dict groups;
    groups["precision_at_1"] = top_relevant.attr("view")("bool");
    groups["ranked_correctly"] = ranked_correctly.attr("view")("bool");
    groups["misranked"] = misranked.attr("view")("bool");
    groups["reciprocal_rank"] = reciprocal_rank;
    groups["wpr"] = wpr;
    groups["average_precision"] = average_precision;
    result["per_group"] = groups;
  }
  return result;
}

}  // namespace

PYBIND11_MODULE(_ranking, m) {
  m.doc() = "Ranking metrics (MP@1, ranking accuracy, MRR, WPR, MAP) over ragged groups";
  m.def("evaluate", &evaluate, py::arg("similarity"), py::arg("relevant"), py::arg("offsets"),
        py::arg("per_group") = false, py::arg("num_threads") = 0,
        py::arg("authors_convention") = false,
        "Evaluates every group; similarity float32/float64 [C], relevant bool [C], offsets "
        "int64 [N+1]. Releases the GIL and runs on up to num_threads threads (0: all cores). "
        "authors_convention: the authors' definitions instead of the paper's "
        "(docs/metrics.md).");
}
