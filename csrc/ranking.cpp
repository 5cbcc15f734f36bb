// Ranking metrics over ragged groups of candidates (SPEC §5).
//
// Each group is sorted once into per-thread scratch space (score descending, irrelevant before
// relevant on equal scores, then input order), and one pass over the sorted list yields every
// metric. Groups are processed in fixed-size blocks pulled by worker threads with the GIL
// released; block sums are added in block order, so results do not depend on the thread count.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kBlockGroups = 2048;
constexpr int64_t kNoError = std::numeric_limits<int64_t>::max();

enum class GroupError : int { kNone = 0, kNaN = 1, kNoRelevant = 2 };

struct Candidate {
  double score;
  uint8_t relevant;
  int64_t index;
};

// SPEC §5 ordering: ties are broken pessimistically (irrelevant first), then by input order.
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

// Per-thread buffers, sized once to the largest group: no allocation per group.
struct Scratch {
  std::vector<Candidate> ranked;
  std::vector<double> relevant_scores;
  std::vector<double> irrelevant_scores;
  explicit Scratch(int64_t max_group)
      : ranked(max_group), relevant_scores(max_group), irrelevant_scores(max_group) {}
};

template <typename Score>
GroupError evaluate_group(const Score* score, const uint8_t* relevant, int64_t n, Scratch& s,
                          GroupMetrics& out) {
  int64_t num_relevant = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = static_cast<double>(score[j]);
    if (std::isnan(v)) return GroupError::kNaN;
    const uint8_t r = relevant[j] ? 1 : 0;
    s.ranked[j] = Candidate{v, r, j};
    num_relevant += r;
  }
  if (num_relevant == 0) return GroupError::kNoRelevant;
  std::sort(s.ranked.begin(), s.ranked.begin() + n, ranks_before);

  // The parallel list of SPEC §5 (WPR): relevant candidates first, each part in ranked order.
  int64_t nr = 0, ni = 0;
  for (int64_t p = 0; p < n; ++p) {
    if (s.ranked[p].relevant)
      s.relevant_scores[nr++] = s.ranked[p].score;
    else
      s.irrelevant_scores[ni++] = s.ranked[p].score;
  }

  int64_t hits = 0, mismatches = 0;
  double precision_sum = 0.0, wpr_sum = 0.0;
  for (int64_t p = 0; p < n; ++p) {
    const Candidate& c = s.ranked[p];
    const double rank = static_cast<double>(p + 1);
    if (c.relevant) {
      if (hits == 0) out.reciprocal_rank = 1.0 / rank;
      ++hits;
      precision_sum += static_cast<double>(hits) / rank;
    }
    const bool parallel_relevant = p < num_relevant;
    if (static_cast<bool>(c.relevant) != parallel_relevant) {
      const double parallel_score =
          parallel_relevant ? s.relevant_scores[p] : s.irrelevant_scores[p - num_relevant];
      wpr_sum += std::fabs(c.score - parallel_score);
      ++mismatches;
    }
  }
  out.top_relevant = s.ranked[0].relevant;
  out.ranked_correctly = mismatches == 0;
  out.misranked = mismatches > 0;
  out.wpr = mismatches > 0 ? wpr_sum / static_cast<double>(mismatches) : 0.0;
  out.average_precision = precision_sum / static_cast<double>(num_relevant);
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

template <typename Score>
void evaluate_blocks(const Score* score, const uint8_t* relevant, const int64_t* offsets,
                     int64_t num_groups, int64_t max_group, const PerGroupOut& per_group,
                     std::vector<BlockResult>& blocks, int num_threads) {
  const int64_t num_blocks = static_cast<int64_t>(blocks.size());
  std::atomic<int64_t> next_block{0};
  std::atomic<int64_t> first_error{kNoError};

  auto worker = [&]() {
    Scratch scratch(max_group);
    for (;;) {
      const int64_t b = next_block.fetch_add(1);
      if (b >= num_blocks) return;
      const int64_t g0 = b * kBlockGroups;
      if (g0 > first_error.load()) continue;  // a bad group was already found before this block
      const int64_t g1 = std::min(num_groups, g0 + kBlockGroups);
      BlockResult block;  // local: neighbouring blocks' results may share a cache line
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t begin = offsets[g], n = offsets[g + 1] - offsets[g];
        GroupMetrics m;
        const GroupError err = evaluate_group(score + begin, relevant + begin, n, scratch, m);
        if (err != GroupError::kNone) {
          block.error = err;
          block.error_group = g;
          int64_t seen = first_error.load();
          while (g < seen && !first_error.compare_exchange_weak(seen, g)) {
          }
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

// Validates offsets (SPEC §2 for candidates) and returns the largest group size.
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
  const bool is_f32 = scores.dtype().is(py::dtype::of<float>());
  const bool is_f64 = scores.dtype().is(py::dtype::of<double>());
  if (!is_f32 && !is_f64) throw py::type_error("similarity must be float32 or float64");
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

  const auto* off = static_cast<const int64_t*>(offsets.data());
  const auto* rel = static_cast<const uint8_t*>(relevant.data());
  const int64_t max_group = check_offsets(off, num_groups, num_candidates);

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
      evaluate_blocks(static_cast<const float*>(scores.data()), rel, off, num_groups, max_group,
                      out, blocks, num_threads);
    else
      evaluate_blocks(static_cast<const double*>(scores.data()), rel, off, num_groups, max_group,
                      out, blocks, num_threads);
  }

  Sums total;
  for (const BlockResult& b : blocks) {
    if (b.error != GroupError::kNone) {
      const std::string g = std::to_string(b.error_group);
      if (b.error == GroupError::kNaN) throw py::value_error("group " + g + " has a NaN similarity");
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
