// Ranking metrics over ragged groups of candidates (docs/metrics.md).
//
// Candidates are ranked by score descending, irrelevant before relevant on equal scores, then
// input order. Groups of up to kSmallGroup candidates count each candidate's rank over all pairs
// (branch-free, SIMD, AVX2 where the CPU has it); larger groups are sorted into per-thread scratch
// space and read in one pass. Groups are processed in fixed-size blocks pulled by worker threads
// with the GIL released; block sums are added in block order, so results do not depend on the
// thread count.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
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

// Per-thread buffers of the sorting path, sized once to the largest group: no allocation per
// group.
struct Scratch {
  std::vector<Candidate> candidates;
  std::vector<double> ranked_scores, parallel;
  std::vector<uint8_t> ranked_relevant;
  explicit Scratch(int64_t max_group)
      : candidates(max_group),
        ranked_scores(max_group),
        parallel(max_group),
        ranked_relevant(max_group) {}
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
// relevance pattern is data and would defeat branch prediction); `parallel` has room for n.
void metrics_from_ranking(const double* ranked_score, const uint8_t* ranked_relevant, int64_t n,
                          int64_t num_relevant, double* parallel, GroupMetrics& out) {
  // The parallel list of WPR (docs/metrics.md): relevant first, each part in ranked order.
  int64_t nr = 0, ni = num_relevant;
  for (int64_t p = 0; p < n; ++p) {
    const bool r = ranked_relevant[p];
    parallel[r ? nr : ni] = ranked_score[p];
    nr += r;
    ni += !r;
  }

  int64_t hits = 0, mismatches = 0, first_hit = n;
  double precision_sum = 0.0, wpr_sum = 0.0;
  for (int64_t p = 0; p < n; ++p) {
    const bool r = ranked_relevant[p];
    first_hit = (r && hits == 0) ? p : first_hit;
    hits += r;
    // Selections as integer factors, not branches: precision at a relevant position, score gap
    // at a mis-ranked one.
    precision_sum += static_cast<double>(r ? hits : 0) / static_cast<double>(p + 1);
    const bool mismatch = r != (p < num_relevant);
    wpr_sum += static_cast<double>(mismatch) * std::fabs(ranked_score[p] - parallel[p]);
    mismatches += mismatch;
  }
  out.top_relevant = ranked_relevant[0];
  out.reciprocal_rank = 1.0 / static_cast<double>(first_hit + 1);
  out.ranked_correctly = mismatches == 0;
  out.misranked = mismatches > 0;
  out.wpr = mismatches > 0 ? wpr_sum / static_cast<double>(mismatches) : 0.0;
  out.average_precision = precision_sum / static_cast<double>(num_relevant);
}

// Groups of at most kSmallGroup candidates, without sorting: for each candidate j, its 0-based
// rank `before` and the relevant candidates ranked before it are counted over all lanes i at once
// (branch-free, fixed-size arrays, SIMD over i, reduced into registers: a value stored by vector
// lanes and read back one lane at a time would stall on store forwarding). The parallel list is
// then filled by its positions and read at each candidate's rank. `available` counts the
// candidates from this group's first to the end of the arrays.
template <typename Score>
[[gnu::always_inline]] inline GroupError evaluate_small(const Score* score,
                                                       const uint8_t* relevant, int64_t n,
                                                       int64_t available, GroupMetrics& out) {
  constexpr int kW = kSmallGroup;
  // Same width as Score so that score and integer comparisons share SIMD lanes.
  using Key = std::conditional_t<sizeof(Score) == 4, int32_t, int64_t>;
  constexpr Key kRelevantKey = 2 * kW;
  constexpr int kRelevantShift = 8;
  // All kW lanes are read at once (lanes >= n hold later groups' candidates and are masked off);
  // near the end of the arrays, from a zero-padded copy.
  Score padded_score[kW];
  uint8_t padded_relevant[kW];
  if (available < kW) {
    std::fill(std::copy_n(score, n, padded_score), padded_score + kW, Score(0));
    std::fill(std::copy_n(relevant, n, padded_relevant), padded_relevant + kW, uint8_t(0));
    score = padded_score;
    relevant = padded_relevant;
  }
  // Each lane is read once into owned storage. key orders equal scores: irrelevant before
  // relevant, then input order.
  // Lanes >= n get score -inf: they precede no candidate (an input -inf is an error).
  alignas(64) Score s[kW];
  alignas(64) Key rel[kW], key[kW], weight[kW];
  Key nan = 0, non_finite = 0, num_relevant = 0;
  for (int j = 0; j < kW; ++j) {
    const Score v = score[j];
    const Key in_group = j < n;
    rel[j] = static_cast<Key>(relevant[j] != 0) & in_group;
    s[j] = in_group ? v : -std::numeric_limits<Score>::infinity();
    key[j] = rel[j] * kRelevantKey + j;
    weight[j] = 1 + (rel[j] << kRelevantShift);
    nan |= in_group & static_cast<Key>(v != v);
    non_finite |= in_group & static_cast<Key>((v - v) != (v - v));  // v - v: 0, or NaN
    num_relevant += rel[j];
  }
  const GroupError err = group_error(nan, non_finite, num_relevant);
  if (err != GroupError::kNone) return err;

  Key rank[kW], parallel_pos[kW], mismatch[kW];
  Key first_hit = kW, mismatches = 0;
  double precision_sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const Score sj = s[j];
    const Key kj = key[j], rj = rel[j];
    // One sum counts both: preceding candidates in the low bits, preceding relevant ones from
    // bit kRelevantShift up.
    Key counts = 0;
#pragma GCC unroll 1  // left to the vectorizer (full unrolling would come first and defeat it)
    for (int i = 0; i < kW; ++i)
      counts += -static_cast<Key>((s[i] > sj) | ((s[i] == sj) & (key[i] < kj))) & weight[i];
    const Key before = counts & ((Key(1) << kRelevantShift) - 1);
    const Key relevant_before = counts >> kRelevantShift;
    rank[j] = before;
    // The parallel list of WPR (docs/metrics.md): relevant first, each part in ranked order.
    parallel_pos[j] = rj ? relevant_before : num_relevant + before - relevant_before;
    mismatch[j] = rj != static_cast<Key>(before < num_relevant);
    mismatches += mismatch[j];
    first_hit = std::min(first_hit, rj ? before : Key(kW));
    // hits / rank at a relevant candidate (AP); an integer factor zeroes the others
    precision_sum += static_cast<double>(rj * (relevant_before + 1)) /
                     static_cast<double>(before + 1);
  }
  double parallel[kW];
  for (int64_t j = 0; j < n; ++j) parallel[parallel_pos[j]] = static_cast<double>(s[j]);
  double wpr_sum = 0.0;
  for (int64_t j = 0; j < n; ++j)
    wpr_sum += static_cast<double>(mismatch[j]) *
               std::fabs(static_cast<double>(s[j]) - parallel[rank[j]]);
  out.top_relevant = first_hit == 0;
  out.reciprocal_rank = 1.0 / static_cast<double>(first_hit + 1);
  out.ranked_correctly = mismatches == 0;
  out.misranked = mismatches > 0;
  out.wpr = mismatches > 0 ? wpr_sum / static_cast<double>(mismatches) : 0.0;
  out.average_precision = precision_sum / static_cast<double>(num_relevant);
  return GroupError::kNone;
}

// Any group size: sort into per-thread scratch space.
template <typename Score>
GroupError evaluate_large(const Score* score, const uint8_t* relevant, int64_t n, Scratch& s,
                          GroupMetrics& out) {
  int64_t num_relevant;
  const GroupError err = load_group(
      score, relevant, n,
      [&](int64_t j, Score v, uint8_t r) {
        s.candidates[j] = Candidate{static_cast<double>(v), r, j};
      },
      num_relevant);
  if (err != GroupError::kNone) return err;
  std::sort(s.candidates.begin(), s.candidates.begin() + n, ranks_before);
  for (int64_t p = 0; p < n; ++p) {
    s.ranked_scores[p] = s.candidates[p].score;
    s.ranked_relevant[p] = s.candidates[p].relevant;
  }
  metrics_from_ranking(s.ranked_scores.data(), s.ranked_relevant.data(), n, num_relevant,
                       s.parallel.data(), out);
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

// Groups [g0, g1); stops at the first bad group.
template <typename Score>
[[gnu::always_inline]] inline BlockResult evaluate_block_body(
    const Score* score, const uint8_t* relevant, const int64_t* offsets, int64_t num_candidates,
    int64_t g0, int64_t g1, Scratch& scratch, const PerGroupOut& per_group) {
  BlockResult block;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t begin = offsets[g], n = offsets[g + 1] - offsets[g];
    GroupMetrics m;
    const GroupError err =
        n <= kSmallGroup
            ? evaluate_small(score + begin, relevant + begin, n, num_candidates - begin, m)
            : evaluate_large(score + begin, relevant + begin, n, scratch, m);
    if (err != GroupError::kNone) {
      block.error = err;
      block.error_group = g;
      break;
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
  }
  return block;
}

// evaluate_block_body compiled for the baseline ISA and, with GCC/Clang on x86-64, also for AVX2
// (8-lane comparisons in evaluate_small, which is always inlined so that it is compiled for the
// caller's ISA), chosen at run time. Same operations in the same order: identical results.
template <typename Score>
BlockResult evaluate_block_baseline(const Score* score, const uint8_t* relevant,
                                    const int64_t* offsets, int64_t num_candidates, int64_t g0,
                                    int64_t g1, Scratch& scratch, const PerGroupOut& per_group) {
  return evaluate_block_body(score, relevant, offsets, num_candidates, g0, g1, scratch,
                             per_group);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Score>
[[gnu::target("avx2")]] BlockResult evaluate_block_avx2(
    const Score* score, const uint8_t* relevant, const int64_t* offsets, int64_t num_candidates,
    int64_t g0, int64_t g1, Scratch& scratch, const PerGroupOut& per_group) {
  return evaluate_block_body(score, relevant, offsets, num_candidates, g0, g1, scratch,
                             per_group);
}
#endif

template <typename Score>
BlockResult evaluate_block(const Score* score, const uint8_t* relevant, const int64_t* offsets,
                           int64_t num_candidates, int64_t g0, int64_t g1, Scratch& scratch,
                           const PerGroupOut& per_group) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2)
    return evaluate_block_avx2(score, relevant, offsets, num_candidates, g0, g1, scratch,
                               per_group);
#endif
  return evaluate_block_baseline(score, relevant, offsets, num_candidates, g0, g1, scratch,
                                 per_group);
}

template <typename Score>
void evaluate_blocks(const Score* score, const uint8_t* relevant, const int64_t* offsets,
                     int64_t num_groups, int64_t num_candidates, int64_t max_group,
                     const PerGroupOut& per_group,
                     std::vector<BlockResult>& blocks, int num_threads) {
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  std::atomic<int64_t> next_block{0};
  std::atomic<int64_t> first_error{kNoError};

  auto worker = [&]() {
    Scratch scratch(max_group > kSmallGroup ? max_group : 0);
    for (;;) {
      const int64_t b = next_block.fetch_add(1);
      if (b >= num_blocks) return;
      const int64_t g0 = b * kBlockGroups;
      if (g0 > first_error.load()) continue;  // a bad group was already found before this block
      const int64_t g1 = std::min(num_groups, g0 + kBlockGroups);
      // local: neighbouring blocks' results may share a cache line
      const BlockResult block = evaluate_block(score, relevant, offsets, num_candidates, g0, g1,
                                               scratch, per_group);
      if (block.error != GroupError::kNone) {
        int64_t seen = first_error.load();
        while (block.error_group < seen &&
               !first_error.compare_exchange_weak(seen, block.error_group)) {
        }
      }
      blocks[b] = block;
    }
  };

  const int threads = static_cast<int>(std::min<int64_t>(num_threads, num_blocks));
  if (threads <= 1) {
    worker();
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) pool.emplace_back(worker);
  for (auto& th : pool) th.join();
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
                  bool per_group, int num_threads) {
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

  std::vector<BlockResult> blocks((num_groups + kBlockGroups - 1) / kBlockGroups);
  {
    py::gil_scoped_release release;
    if (is_f32)
      evaluate_blocks(static_cast<const float*>(scores.data()), rel, off.data(), num_groups,
                      num_candidates, max_group, out, blocks, num_threads);
    else
      evaluate_blocks(static_cast<const double*>(scores.data()), rel, off.data(), num_groups,
                      num_candidates, max_group, out, blocks, num_threads);
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
        "Evaluates every group; similarity float32/float64 [C], relevant bool [C], offsets "
        "int64 [N+1]. Releases the GIL and runs on num_threads threads (0: all cores).");
}
