// The EPLB planner's replan core (elasticep/eplb/planner.py and _repack.py) in C++.
//
// The Python modules are the reference: this file computes the same plans, step for step, and
// tests/test_eplb_native.py checks that the two agree on seeded cases. To agree to the last bit,
// every floating-point expression here is evaluated in the order and the precision numpy uses
// for the reference's: sums over a row follow numpy's pairwise summation (np_sum), the local
// search scores its candidate steps in float32 where the reference does, and ties go to the
// lowest index as np.argmin / np.argmax / stable sorts break them. The reference works on all
// layers at once; here the work is a loop per layer, with the few decisions that span layers
// (the move budget, the repack of the layers that stay off balance) taken after each round
// exactly as there. Build flags: no fast-math and no floating-point contraction (setup.py).
//
// Nothing here allocates more than a few arrays of [layers, slots]; no I/O, no threads.

#include "eplb_planner.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace elasticep {

#if defined(__SSE2__)  // x86-64; elsewhere the module has no eplb_plan_core and the numpy planner runs

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kMinGain = 1e-9;  // planner._MIN_GAIN
constexpr int kDescentPartners = 8;  // planner._DESCENT_PARTNERS
constexpr double kReseatSlack[] = {0.0, 0.05, 0.1, 0.2};  // planner._RESEAT_SLACK (the first is 0)

using IVec = std::vector<int64_t>;
using DVec = std::vector<double>;

// numpy's pairwise summation of a contiguous float64 row (add.reduce over the last axis).
double np_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = 0.0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return np_sum(a, n2) + np_sum(a + n2, n - n2);
}

// numpy's sum over axis 1 of a [rows, n] array taken from a wider one by a column index
// (x[:, target]): numpy lays that out column-major, so with two rows or more each row's sum runs
// in index order; a single row is contiguous and summed pairwise.
double np_sum_cols(const double* a, int64_t n, int64_t rows) {
  if (rows <= 1) return np_sum(a, n);
  double res = 0.0;
  for (int64_t i = 0; i < n; ++i) res += a[i];
  return res;
}

double np_mean(const DVec& v) { return np_sum(v.data(), (int64_t)v.size()) / (double)v.size(); }

// Indices sorted by key ascending, ties in index order (np.argsort(kind="stable")).
template <class Key>
std::vector<int> stable_order(int n, Key key) {
  std::vector<int> o(n);
  std::iota(o.begin(), o.end(), 0);
  if (n <= 64) {  // insertion sort: stable, and no buffer for the short lists sorted per round
    for (int i = 1; i < n; ++i) {
      int v = o[i];
      auto kv = key(v);
      int j = i - 1;
      while (j >= 0 && kv < key(o[j])) {
        o[j + 1] = o[j];
        --j;
      }
      o[j + 1] = v;
    }
    return o;
  }
  std::stable_sort(o.begin(), o.end(), [&](int x, int y) { return key(x) < key(y); });
  return o;
}

// Throughout, a division by a rank's speed is left out when every speed is 1.0: x / 1.0 is x
// exactly, so the results do not change.
struct Prob {
  int E = 0, R = 0, S = 0, N = 0;
  std::vector<uint8_t> target;  // [R]
  DVec speed;                   // [R]
  std::vector<int> tgt;         // target rank ids, ascending
  bool uniform = true;
  double spd_sum = 0.0;  // speed[target].sum()
  double spd_max = 0.0, spd_min = 0.0;
  double tol = 0.01;
};

// Rows of a batch: B placements [B, N] and their loads [B, E] (copies of the layers involved).
struct Batch {
  int B = 0;
  IVec p;    // [B, N]
  IVec cur;  // [B, N]
  DVec w;    // [B, E]
};

// ------------------------------------------------------------------ metrics (one row)

// planner._rank_loads for one row: rank loads [R] and replica counts [E].
void rank_loads_row(const Prob& pr, const int64_t* p, const double* w, double* rank_load, int64_t* cnt) {
  const int E = pr.E, S = pr.S, R = pr.R;
  std::fill(cnt, cnt + E, 0);
  for (int s = 0; s < pr.N; ++s)
    if (p[s] >= 0) ++cnt[p[s]];
  double slot[64];
  std::vector<double> big;
  double* sl = slot;
  if (S > 64) {
    big.resize(S);
    sl = big.data();
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < S; ++j) {
      int64_t e = p[r * S + j];
      sl[j] = e < 0 ? 0.0 : w[e] / (double)std::max<int64_t>(cnt[e], 1);
    }
    rank_load[r] = np_sum(sl, S);
  }
}

// planner._layer_balance for one row of a call on `rows` rows.
double layer_balance_row(const Prob& pr, const double* rank_load, int64_t rows) {
  static thread_local DVec tl;
  tl.resize(pr.tgt.size());
  double mx = -kInf;
  for (size_t k = 0; k < pr.tgt.size(); ++k) {
    int r = pr.tgt[k];
    tl[k] = rank_load[r];
    mx = std::max(mx, pr.uniform ? rank_load[r] : rank_load[r] / pr.speed[r]);
  }
  double total = np_sum_cols(tl.data(), (int64_t)tl.size(), rows);
  double mean = total / pr.spd_sum;
  return total > 0 ? mx / mean : 1.0;
}

double balance_row(const Prob& pr, const int64_t* p, const double* w, int64_t rows) {
  static thread_local DVec rl;
  static thread_local IVec cnt;
  rl.resize(pr.R);
  cnt.resize(pr.E);
  rank_loads_row(pr, p, w, rl.data(), cnt.data());
  return layer_balance_row(pr, rl.data(), rows);
}

int64_t moves_row(const Prob& pr, const int64_t* p, const int64_t* cur) {
  int64_t m = 0;
  for (int s = 0; s < pr.N; ++s) m += (p[s] != cur[s] && p[s] >= 0);
  return m;
}

// ------------------------------------------------------------------ planner._State, one row

struct RowState {
  std::vector<int> idx;  // [N] expert of each slot, E for empty
  DVec cnt;              // [E+1]
  DVec u, u_plus, delta;  // [E+1]
  DVec slot_u, slot_delta;  // [N]
  DVec load, eff;           // [R]
  DVec host_max;            // [E+1]
  DVec A1, A2;              // [E+1]
};

// A state already computed for this row (same loads) is updated: the per-expert quotients are
// recomputed only where an expert's replica count changed (the same divisions, so the same bits).
void compute_state(const Prob& pr, const int64_t* p, const double* w, RowState& st, bool full) {
  const int E = pr.E, S = pr.S, N = pr.N, R = pr.R, E1 = pr.E + 1;
  const bool again = (int)st.cnt.size() == E1 && (!full || (int)st.u_plus.size() == E1);
  static thread_local DVec old;
  if (again) old = st.cnt;
  st.idx.resize(N);
  st.cnt.assign(E1, 0.0);
  for (int s = 0; s < N; ++s) {
    int e = p[s] < 0 ? E : (int)p[s];
    st.idx[s] = e;
    st.cnt[e] += 1.0;
  }
  st.cnt[E] = 0.0;
  st.u.resize(E1);
  st.delta.resize(E1);
  if (full) st.u_plus.resize(E1);
  for (int e = 0; e < E1; ++e) {
    double c = st.cnt[e];
    if (again && e < E && old[e] == c) continue;
    double we = e < E ? w[e] : 0.0;
    st.u[e] = we / std::max(c, 1.0);
    st.delta[e] = c >= 2 ? we / (c - 1) - st.u[e] : kInf;
    if (full) st.u_plus[e] = we / (c + 1);
  }
  st.delta[E] = 0.0;
  st.slot_u.resize(N);
  st.slot_delta.resize(N);
  for (int s = 0; s < N; ++s) {
    st.slot_u[s] = st.u[st.idx[s]];
    st.slot_delta[s] = st.delta[st.idx[s]];
  }
  st.load.resize(R);
  st.eff.resize(R);
  for (int r = 0; r < R; ++r) {
    st.load[r] = np_sum(st.slot_u.data() + r * S, S);
    st.eff[r] = pr.uniform ? st.load[r] : st.load[r] / pr.speed[r];
  }
  st.host_max.assign(E1, -kInf);
  for (int r = 0, s = 0; r < R; ++r) {
    const double es = st.eff[r];
    for (int j = 0; j < S; ++j, ++s) {
      const int e = st.idx[s];
      if (p[s] >= 0 && st.cnt[e] >= 2) {
        double v = pr.uniform ? es + st.slot_delta[s] : es + st.slot_delta[s] / pr.speed[r];
        st.host_max[e] = std::max(st.host_max[e], v);
      }
    }
  }
  if (!full) return;
  st.A1.assign(E1, 0.0);
  if (pr.uniform) {
    for (int r = 0, s = 0; r < R; ++r)
      for (int j = 0; j < S; ++j, ++s) st.A1[st.idx[s]] += st.eff[r];
    st.A2 = st.cnt;
  } else {
    st.A2.assign(E1, 0.0);
    for (int r = 0, s = 0; r < R; ++r) {
      const double inv_r = 1.0 / pr.speed[r];
      for (int j = 0; j < S; ++j, ++s) {
        double inv = p[s] >= 0 ? inv_r : 0.0;
        st.A1[st.idx[s]] += st.eff[r] * inv;
        st.A2[st.idx[s]] += inv * inv;
      }
    }
  }
}

// _State.exact for one row of a call on `rows` rows (peak effective target load, sum of squares,
// coverage), for a trial placement that differs from the state's in a few slots: the load per
// replica is the state's wherever the trial leaves an expert's count alone (the same quotient).
void exact_trial(const Prob& pr, const RowState& st, const int64_t* p, const double* w, int64_t rows, double& t_max,
                 double& t_ss, bool& cov) {
  static thread_local DVec slot, sq;
  static thread_local IVec cnt;
  const int E = pr.E, S = pr.S, N = pr.N;
  cnt.assign(E, 0);
  for (int s = 0; s < N; ++s)
    if (p[s] >= 0) ++cnt[p[s]];
  slot.resize(S);
  sq.resize(pr.tgt.size());
  t_max = -kInf;
  for (size_t k = 0; k < pr.tgt.size(); ++k) {
    const int r = pr.tgt[k];
    for (int j = 0; j < S; ++j) {
      const int64_t e = p[r * S + j];
      slot[j] = e < 0 ? 0.0 : ((double)cnt[e] == st.cnt[e] ? st.u[e] : w[e] / (double)std::max<int64_t>(cnt[e], 1));
    }
    const double load = np_sum(slot.data(), S);
    const double eff = pr.uniform ? load : load / pr.speed[r];
    t_max = std::max(t_max, eff);
    sq[k] = eff * eff;
  }
  t_ss = np_sum_cols(sq.data(), (int64_t)sq.size(), rows);
  cov = true;
  for (int e = 0; e < E; ++e)
    if (cnt[e] == 0) cov = false;
}

// ------------------------------------------------------------------ repair (planner._repair)

int64_t repair_row(const Prob& pr, int64_t* p, const double* w) {
  const int E = pr.E, S = pr.S, R = pr.R;
  IVec cnt(E);
  DVec rl(R);
  rank_loads_row(pr, p, w, rl.data(), cnt.data());
  int64_t left = 0;
  for (int e = 0; e < E; ++e) left += cnt[e] == 0;
  const int64_t lb = left;
  if (!lb) return 0;
  DVec key(E);
  for (int e = 0; e < E; ++e) key[e] = -(cnt[e] == 0 ? w[e] : -1.0);
  std::vector<int> miss_order = stable_order(E, [&](int e) { return key[e]; });
  int64_t done = 0;
  RowState st;
  DVec offer(R);
  std::vector<int> slot(R), evicted(R);
  std::vector<uint8_t> seen(E);
  while (left > 0) {
    compute_state(pr, p, w, st, false);
    for (int r = 0; r < R; ++r) {
      double best = kInf;
      int col = 0;
      for (int j = 0; j < S; ++j) {
        int s = r * S + j;
        double sc = kInf;
        if (pr.target[r] && std::isfinite(st.slot_delta[s])) {
          double a = st.eff[r] - (pr.uniform ? st.slot_u[s] : st.slot_u[s] / pr.speed[r]);
          double b = st.host_max[st.idx[s]];
          sc = std::max(a, b);
        }
        if (sc < best) {
          best = sc;
          col = j;
        }
      }
      offer[r] = best;
      slot[r] = r * S + col;
      evicted[r] = st.idx[r * S + col];
    }
    std::vector<int> order = stable_order(R, [&](int r) { return offer[r]; });
    std::fill(seen.begin(), seen.end(), 0);
    int64_t rank_in = -1, placed = 0;
    for (int m = 0; m < R; ++m) {
      int r = order[m];
      bool keep = true;
      if (evicted[r] < E) {
        keep = !seen[evicted[r]];
        seen[evicted[r]] = 1;
      }
      bool ok = keep && std::isfinite(offer[r]);
      if (!ok) continue;
      ++rank_in;
      if (rank_in >= left) continue;
      int64_t pos = std::min<int64_t>(done + rank_in, E - 1);
      p[slot[r]] = miss_order[pos];
      ++placed;
    }
    if (placed == 0) throw std::logic_error("coverage repair found no legal slot");
    done += placed;
    left -= placed;
  }
  return lb;
}

// ------------------------------------------------------------------ _repack

// _repack.keep_counts for one row (cnt: live replicas now) -> counts summing to live.
// Each expert's load per replica (w / c) and per remaining replica if it gives one up
// (w / (c - 1), inf below two), kept up to date as the counts change.
// The first index of the smallest value below +inf (of the largest above -inf), 0 when there is
// none; first_argmax's ``value`` gets that value (or -inf).
int first_argmin(const double* a, int n) {
  double best = kInf;
  int at = 0;
  for (int i = 0; i < n; ++i)
    if (a[i] < best) {
      best = a[i];
      at = i;
    }
  return at;
}

int first_argmax(const double* a, int n, double* value = nullptr) {
  double best = -kInf;
  int at = 0;
  for (int i = 0; i < n; ++i)
    if (a[i] > best) {
      best = a[i];
      at = i;
    }
  if (value != nullptr) *value = best;
  return at;
}

struct Quotients {
  DVec per, spare;
  void init(const int64_t* c, const double* w, int E) {
    per.resize(E);
    spare.resize(E);
    for (int e = 0; e < E; ++e) update(c, w, e);
  }
  void update(const int64_t* c, const double* w, int e) {
    per[e] = w[e] / (double)c[e];
    spare[e] = c[e] >= 2 ? w[e] / (double)std::max<int64_t>(c[e] - 1, 1) : kInf;
  }
};

void keep_counts_row(const int64_t* cnt, const double* w, int E, int64_t live, int64_t* c) {
  int64_t tot = 0;
  for (int e = 0; e < E; ++e) {
    c[e] = std::max<int64_t>(cnt[e], 1);
    tot += c[e];
  }
  if (tot == live) return;
  static thread_local Quotients q;
  q.init(c, w, E);
  while (tot != live) {
    if (tot > live) {
      const int give = first_argmin(q.spare.data(), E);
      --c[give];
      --tot;
      q.update(c, w, give);
    } else {
      const int take = first_argmax(q.per.data(), E);
      ++c[take];
      ++tot;
      q.update(c, w, take);
    }
  }
}

// _repack.restore_counts for one row.
void restore_counts_row(int64_t* c, const double* w, int E, double ceiling, int max_steps) {
  static thread_local Quotients q;
  q.init(c, w, E);
  for (int step = 0; step < max_steps; ++step) {
    double top;
    const int take = first_argmax(q.per.data(), E, &top);
    double best = kInf;
    int give = 0;
    for (int e = 0; e < E; ++e) {
      double v = e == take ? kInf : q.spare[e];
      if (v < best) {
        best = v;
        give = e;
      }
    }
    if (!(top > ceiling && best < top)) break;
    ++c[take];
    --c[give];
    q.update(c, w, take);
    q.update(c, w, give);
  }
}

// _repack.repack over a batch of rows; p0 rows are replaced by the packed placements.
// max_bumps < 0: no limit given (each row's pool).
void repack_batch(const Prob& pr, int B, int64_t* P, const double* W, const int64_t* C, const DVec& tau,
                  int64_t max_bumps) {
  const int E = pr.E, S = pr.S, R = pr.R, N = pr.N;
  if (B == 0) return;
  DVec mean(B);
  for (int b = 0; b < B; ++b) mean[b] = np_sum(W + (int64_t)b * E, E) / pr.spd_sum;
  double mean_max = *std::max_element(mean.begin(), mean.end());
  const double BIG = 4.0 * (mean_max + 1.0) * pr.spd_max / pr.spd_min + 1.0;

  // per-row working state kept across the phases
  std::vector<IVec> pool(B, IVec(E));
  std::vector<DVec> loadv(B, DVec(R)), slotuv(B, DVec(N)), uv(B, DVec(E + 1)), capv(B, DVec(R));
  IVec bumps_left(B);
  int64_t limit = 0;
  for (int b = 0; b < B; ++b) {
    int64_t* p = P + (int64_t)b * N;
    const double* w = W + (int64_t)b * E;
    const int64_t* c = C + (int64_t)b * E;
    DVec& u = uv[b];
    for (int e = 0; e < E; ++e) u[e] = w[e] / (double)c[e];
    u[E] = 0.0;
    IVec cc(E, 0);
    for (int s = 0; s < N; ++s)
      if (p[s] >= 0) ++cc[p[s]];
    DVec& cap = capv[b];
    for (int r = 0; r < R; ++r) cap[r] = pr.target[r] ? ((1.0 + tau[b]) * mean[b]) * pr.speed[r] : -kInf;
    DVec& slot_u = slotuv[b];
    DVec& load = loadv[b];
    auto refresh = [&]() {
      for (int s = 0; s < N; ++s) slot_u[s] = u[p[s] < 0 ? E : p[s]];
      for (int r = 0; r < R; ++r) load[r] = np_sum(slot_u.data() + r * S, S);
    };
    refresh();
    // 1. surplus replicas leave the most loaded ranks
    bool any_surplus = false;
    for (int e = 0; e < E; ++e) any_surplus |= cc[e] > c[e];
    if (any_surplus) {
      // each expert over its count drops its replicas on the most loaded ranks (ties: lowest
      // slot first), as the reference's sort by (expert, -rank load) does
      DVec slot_eff(N);
      for (int s = 0; s < N; ++s) slot_eff[s] = pr.uniform ? load[s / S] : load[s / S] / pr.speed[s / S];
      std::vector<int> slots;  // the slots of the experts over their count, in slot order
      for (int s = 0; s < N; ++s)
        if (p[s] >= 0 && cc[p[s]] > c[p[s]]) slots.push_back(s);
      std::stable_sort(slots.begin(), slots.end(), [&](int x, int y) {
        if (p[x] != p[y]) return p[x] < p[y];
        return -slot_eff[x] < -slot_eff[y];
      });
      for (size_t m = 0; m < slots.size();) {
        const int64_t e = p[slots[m]];
        size_t n = m;
        while (n < slots.size() && p[slots[n]] == e) ++n;
        const int64_t sur = cc[e] - c[e];
        for (int64_t k = 0; k < sur; ++k) p[slots[m + k]] = -1;
        m = n;
      }
      refresh();
    }
    IVec& pl = pool[b];
    for (int e = 0; e < E; ++e) pl[e] = c[e];
    for (int s = 0; s < N; ++s)
      if (p[s] >= 0) --pl[p[s]];
    // 2. ranks over their target load evict
    for (int round = 0; round < S; ++round) {
      std::vector<int> over;
      DVec excess(R);
      for (int r = 0; r < R; ++r) {
        excess[r] = load[r] - cap[r];
        if (excess[r] > 1e-12 * mean[b] && pr.target[r]) over.push_back(r);
      }
      if (over.empty()) break;
      for (int r : over) {
        double sf = kInf, lg = -kInf;
        int cf = 0, cl = 0;
        bool any_fit = false;
        // with slack, the rank's largest replica stays when its others make up the excess
        int top = -1;
        if (tau[b] > 0) {
          double tv = -kInf, rest[64];
          std::vector<double> rest_big;
          double* rv = rest;
          if (S > 64) {
            rest_big.resize(S);
            rv = rest_big.data();
          }
          int tc = 0;
          for (int j = 0; j < S; ++j) {
            double val = p[r * S + j] >= 0 ? slot_u[r * S + j] : -kInf;
            if (val > tv) {
              tv = val;
              tc = j;
            }
          }
          for (int j = 0; j < S; ++j) rv[j] = (j != tc && p[r * S + j] >= 0) ? slot_u[r * S + j] : 0.0;
          if (np_sum(rv, S) >= excess[r]) top = tc;
        }
        for (int j = 0; j < S; ++j) {
          int s = r * S + j;
          bool occ = p[s] >= 0 && j != top;
          double su = slot_u[s];
          bool fits = occ && su >= excess[r];
          any_fit |= fits;
          double vf = fits ? su : kInf;
          if (vf < sf) {
            sf = vf;
            cf = j;
          }
          double vl = occ ? su : -kInf;
          if (vl > lg) {
            lg = vl;
            cl = j;
          }
        }
        int s = r * S + (any_fit ? cf : cl);
        int64_t e = p[s];
        load[r] -= slot_u[s];
        pl[e < 0 ? E - 1 : e] += 1;  // (e < 0 cannot happen: an over rank holds something)
        p[s] = -1;
        slot_u[s] = 0.0;
      }
    }
    int64_t ps = 0;
    for (int e = 0; e < E; ++e) ps += pl[e];
    limit = std::max(limit, ps);
    bumps_left[b] = max_bumps < 0 ? ps : max_bumps;
  }
  int64_t max_bl = 0;
  for (int b = 0; b < B; ++b) max_bl = std::max(max_bl, bumps_left[b]);
  const int64_t iters = limit + max_bl + 1;

  // 3. place the pool, heaviest first
  for (int b = 0; b < B; ++b) {
    int64_t* p = P + (int64_t)b * N;
    IVec& pl = pool[b];
    DVec& load = loadv[b];
    DVec& slot_u = slotuv[b];
    DVec& u = uv[b];
    DVec& cap = capv[b];
    std::vector<int> nfree(R, 0);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < S; ++j) nfree[r] += (p[r * S + j] < 0 && pr.target[r]);
    std::vector<int> vcol(R);
    // each rank's smallest replica (first slot on ties; inf when it holds none), kept up to date
    // as its slots change: the smallest replica lighter than x is that one or none
    DVec rmin(R);
    std::vector<int> rmin_col(R);
    auto rank_min = [&](int r) {
      double vm = kInf;
      int vc = 0;
      for (int j = 0; j < S; ++j) {
        int s = r * S + j;
        if (p[s] >= 0 && slot_u[s] < vm) {
          vm = slot_u[s];
          vc = j;
        }
      }
      rmin[r] = vm;
      rmin_col[r] = vc;
    };
    for (int r = 0; r < R; ++r) rank_min(r);
    int64_t todo = 0;
    // experts with replicas in the pool, a heap with the heaviest replica on top (ties: lowest
    // id), as the reference's argmax over the pool; an expert is in it while its pool count is
    // positive, and only the top's count ever falls
    auto lighter = [&](int a, int c) { return u[a] < u[c] || (u[a] == u[c] && a > c); };
    std::vector<int> waiting;
    for (int e = 0; e < E; ++e) {
      todo += pl[e];
      if (pl[e] > 0) waiting.push_back(e);
    }
    std::make_heap(waiting.begin(), waiting.end(), lighter);
    for (int64_t it = 0; it < iters; ++it) {
      if (todo <= 0) break;
      const int e_star = waiting.front();
      const double x = u[e_star];
      // the best free slot and the best bump over the ranks, in two branch-free passes (the
      // reference's scores, the first rank on ties)
      double best_free = kInf, best_bump = kInf;
      int r_free = 0, r_bump = 0;
      for (int r = 0; r < R; ++r) {
        const double nf = load[r] + x;
        const double sf = (nf <= cap[r] ? 0.0 : 2.0 * BIG) + (pr.uniform ? nf : nf / pr.speed[r]);
        const double sfree = nfree[r] > 0 ? sf : kInf;
        const bool lt = sfree < best_free;
        best_free = lt ? sfree : best_free;
        r_free = lt ? r : r_free;
      }
      const double lighter_than = x * (1 - 1e-9);
      if (bumps_left[b] > 0) {
        for (int r = 0; r < R; ++r) {
          // a full target rank bumps its smallest replica lighter than x (else, as the
          // reference's argmin over no candidate, its first slot's)
          const double vr = rmin[r] < lighter_than ? rmin[r] : slot_u[r * S];
          const bool can = nfree[r] == 0 && pr.target[r] && std::isfinite(vr);
          const double nb = load[r] + x - vr;
          const double sb = (nb <= cap[r] ? BIG : 2.0 * BIG) + (pr.uniform ? nb : nb / pr.speed[r]);
          const double sbump = can ? sb : kInf;
          const bool lt = sbump < best_bump;
          best_bump = lt ? sbump : best_bump;
          r_bump = lt ? r : r_bump;
        }
        vcol[r_bump] = rmin[r_bump] < lighter_than ? rmin_col[r_bump] : 0;
      }
      if (!(std::isfinite(best_free) || std::isfinite(best_bump))) break;  // nothing changes any more
      bool ub = best_bump < best_free;
      int r = ub ? r_bump : r_free;
      int fcol = 0;
      for (int j = 0; j < S; ++j)
        if (p[r * S + j] < 0 && pr.target[r]) {
          fcol = j;
          break;
        }
      int col = ub ? vcol[r] : fcol;
      int s = r * S + col;
      int64_t old = p[s];
      load[r] += x - (ub ? slot_u[s] : 0.0);
      p[s] = e_star;
      slot_u[s] = x;
      rank_min(r);
      if (!ub) nfree[r] -= 1;
      if (--pl[e_star] == 0) {
        std::pop_heap(waiting.begin(), waiting.end(), lighter);
        waiting.pop_back();
      }
      --todo;
      if (ub) {
        if (pl[old]++ == 0) {
          waiting.push_back((int)old);
          std::push_heap(waiting.begin(), waiting.end(), lighter);
        }
        bumps_left[b] -= 1;
        ++todo;
      }
    }
    for (int e = 0; e < E; ++e)
      if (pl[e] > 0) throw std::logic_error("repack left replicas unplaced");
  }
}

// ------------------------------------------------------------------ rebalance (planner._rebalance)

struct Step {
  bool good = false;
  int kind = 0;
  int slot_i = 0, slot_j = 0;
  int64_t e_i = 0, e_j = 0, new_i = 0, new_j = 0;
  int64_t cost = 0;
  double e_h = 0.0;
};

inline int64_t slot_cost(int64_t cur, int64_t now, int64_t nw) {
  int64_t before = (now != cur) && now >= 0;
  int64_t after = (nw != cur) && nw >= 0;
  return after - before;
}

// Rows of `bt` are rebalanced in place. budget < 0: no budget.
void rebalance(const Prob& pr, Batch& bt, int64_t budget, int max_pairs) {
  const int E = pr.E, S = pr.S, N = pr.N, B = bt.B;
  const int nt = (int)pr.tgt.size();
  const int K = std::min(max_pairs, nt / 2);
  if (budget == 0 || K == 0 || B == 0) return;
  const bool has_budget = budget >= 0;
  int64_t remaining = budget;
  std::vector<uint8_t> active(B, 1);
  std::vector<uint8_t> banned((size_t)B * N, 0);
  DVec mean_all(B), scale_all(B);
  for (int b = 0; b < B; ++b) {
    mean_all[b] = np_sum(bt.w.data() + (int64_t)b * E, E) / pr.spd_sum;
    scale_all[b] = std::max(mean_all[b], 1e-300);
  }
  std::vector<RowState> st(B);
  for (int b = 0; b < B; ++b) compute_state(pr, bt.p.data() + (int64_t)b * N, bt.w.data() + (int64_t)b * E, st[b], true);
  std::vector<Step> steps((size_t)B * K);
  DVec old_max(B), old_ss(B);
  std::vector<int> hot(K), cold(K);
  std::vector<int> a(S), x(S);
  std::vector<uint8_t> ok_i(S), ok_j(S);
  DVec term_i(S), term_j(S), ua(S), ux(S);
  const int SP = (S + 3) & ~3;  // rows of scores padded to whole SSE vectors
  std::vector<float> Pf(S), Qf(SP), Tj(SP), uxf(SP), buf((size_t)2 * S * SP);
  std::vector<int> okj1(SP), okj2(SP), xs(SP);
  DVec eff_t(nt), sq(nt);
  IVec trial(N);
  for (int64_t round = 0; round < 4 * (int64_t)N; ++round) {
    std::vector<int> sub;
    for (int b = 0; b < B; ++b) {
      if (!active[b]) continue;
      double mx = -kInf;
      for (int r : pr.tgt) mx = std::max(mx, st[b].eff[r]);
      if (!(mx > (1.0 + pr.tol) * mean_all[b])) active[b] = 0;
      else sub.push_back(b);
    }
    if (sub.empty()) break;
    bool any_some = false;
    for (int b : sub) {
      const RowState& s = st[b];
      const int64_t* p = bt.p.data() + (int64_t)b * N;
      const int64_t* cur = bt.cur.data() + (int64_t)b * N;
      const double scale = scale_all[b];
      const double eps = kMinGain * scale;
      double mx = -kInf;
      for (int k = 0; k < nt; ++k) {
        eff_t[k] = s.eff[pr.tgt[k]];
        mx = std::max(mx, eff_t[k]);
        sq[k] = eff_t[k] * eff_t[k];
      }
      old_max[b] = mx;
      old_ss[b] = np_sum(sq.data(), nt);
      std::vector<int> order = stable_order(nt, [&](int k) { return -eff_t[k]; });
      for (int k = 0; k < K; ++k) {
        hot[k] = pr.tgt[order[k]];
        cold[k] = pr.tgt[order[nt - 1 - k]];
      }
      const uint8_t* ban = banned.data() + (int64_t)b * N;
      const double good_lim = (-1e-6 * scale) * scale;
      bool some = false;
      for (int k = 0; k < K; ++k) {
        const int h = hot[k], q = cold[k];
        const double eh = s.eff[h], eq = s.eff[q];
        const double sph = pr.speed[h], spq = pr.speed[q];
        const double thr = eh - eps;
        // x / 1.0 is x exactly: with uniform speeds the divisions by a speed are left out
        const bool un = pr.uniform;
        for (int i = 0; i < S; ++i) a[i] = s.idx[h * S + i];
        for (int i = 0; i < S; ++i) {
          const int hs = h * S + i;
          const int ai = a[i];
          ua[i] = s.slot_u[hs];
          const double uap = s.u_plus[ai];
          double n_a = 0.0;
          for (int i2 = 0; i2 < S; ++i2) n_a += (a[i2] == ai);
          const double d_a = ua[i] - uap;
          const double nh1 = eh - (un ? n_a * d_a : (n_a * d_a) / sph);
          const double a_rest = ((-2.0 * d_a) * s.A1[ai] + (d_a * d_a) * s.A2[ai]) -
                                n_a * (un ? ((-2.0 * eh) * d_a) + (d_a * d_a)
                                          : (((-2.0 * eh) * d_a) / sph) + ((d_a * d_a) / (sph * sph)));
          term_i[i] = ((nh1 * nh1) - (eh * eh)) + a_rest;
          ok_i[i] = ai < E && nh1 < thr;
          Pf[i] = (float)(un ? uap : uap / spq);
        }
        for (int j = 0; j < S; ++j) {
          const int qs = q * S + j;
          const int xj = s.idx[qs];
          x[j] = xj;
          ux[j] = s.slot_u[qs];
          const double dx = s.slot_delta[qs];
          const double xh = s.host_max[xj];
          const double dxf = std::isfinite(dx) ? dx : 0.0;
          term_j[j] = (((2.0 * dxf) * s.A1[xj]) + ((dxf * dxf) * s.A2[xj])) -
                      (un ? ((2.0 * eq) * dxf) + (dxf * dxf) : (((2.0 * eq) * dxf) / spq) + ((dxf * dxf) / (spq * spq)));
          const double x_peak = dxf > 0 ? (std::isfinite(xh) ? xh : -kInf) : -kInf;
          ok_j[j] = std::isfinite(dx) && !ban[qs] && x_peak < thr;
          Qf[j] = (float)(un ? ux[j] : ux[j] / spq);
        }
        const float eq4 = (float)eq;
        const float two_eq = 2.0f * eq4;
        const float lim_q = (float)(thr - eq);
        const float lim_h = (float)(thr - eh);
        const float two_eh = 2.0f * (float)eh;
        const float inv_h = (float)(1.0 / sph), inv_q = (float)(1.0 / spq);
        // Scores of all (i, j), four j at a time (SSE2: the same IEEE operations per lane as
        // numpy's float32 arrays), into rows padded to SP with entries that are never ok; then
        // the first smallest in np.argmin's order: kind 0 (replicate) over (i, j), then kind 1.
        for (int j = 0; j < SP; ++j) {
          const bool in = j < S;
          Tj[j] = in ? (float)term_j[j] : 0.0f;
          Qf[j] = in ? Qf[j] : 0.0f;
          uxf[j] = in ? (float)ux[j] : 0.0f;
          xs[j] = in ? x[j] : -2;
          okj1[j] = (in && ok_j[j]) ? -1 : 0;
          okj2[j] = (in && x[j] < E && !ban[q * S + j]) ? -1 : 0;
        }
        const __m128 v_inf = _mm_set1_ps(kInfF), v_sign = _mm_set1_ps(-0.0f);
        const __m128 v_two_eq = _mm_set1_ps(two_eq), v_two_eh = _mm_set1_ps(two_eh);
        const __m128 v_lim_q = _mm_set1_ps(lim_q), v_lim_h = _mm_set1_ps(lim_h);
        const __m128 v_inv_h = _mm_set1_ps(inv_h), v_inv_q = _mm_set1_ps(inv_q), v_half = _mm_set1_ps(0.5f);
        float best = kInfF;
        int best_row = -1;  // the first row (kind * S + i) holding the smallest score
        auto row_min = [&](__m128 m, int row_id) {
          m = _mm_min_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
          m = _mm_min_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
          const float v = _mm_cvtss_f32(m);
          if (v < best) {
            best = v;
            best_row = row_id;
          }
        };
        float* sc1 = buf.data();
        float* sc2 = sc1 + S * SP;
        for (int i = 0; i < S; ++i) {
          float* row = sc1 + i * SP;
          if (!ok_i[i]) {
            for (int j = 0; j < SP; j += 4) _mm_storeu_ps(row + j, v_inf);
            continue;
          }
          const __m128 vP = _mm_set1_ps(Pf[i]), vti = _mm_set1_ps((float)term_i[i]);
          const __m128i vai = _mm_set1_epi32(a[i]);
          __m128 v_min = v_inf;
          for (int j = 0; j < SP; j += 4) {
            const __m128 dq = _mm_sub_ps(vP, _mm_loadu_ps(&Qf[j]));
            __m128 d = _mm_mul_ps(dq, _mm_add_ps(v_two_eq, dq));
            d = _mm_add_ps(d, _mm_add_ps(vti, _mm_loadu_ps(&Tj[j])));
            const __m128i xv = _mm_loadu_si128((const __m128i*)&xs[j]);
            const __m128i okj = _mm_loadu_si128((const __m128i*)&okj1[j]);
            const __m128i differ = _mm_andnot_si128(_mm_cmpeq_epi32(vai, xv), okj);
            const __m128 ok = _mm_and_ps(_mm_cmplt_ps(dq, v_lim_q), _mm_castsi128_ps(differ));
            const __m128 sc = _mm_or_ps(_mm_and_ps(ok, d), _mm_andnot_ps(ok, v_inf));
            _mm_storeu_ps(row + j, sc);
            v_min = _mm_min_ps(v_min, sc);
          }
          row_min(v_min, i);
        }
        for (int i = 0; i < S; ++i) {
          float* row = sc2 + i * SP;
          const __m128 vua = _mm_set1_ps((float)ua[i]);
          const __m128i vai = _mm_set1_epi32(a[i]);
          __m128 v_min = v_inf;
          for (int j = 0; j < SP; j += 4) {
            const __m128 d2 = _mm_sub_ps(_mm_loadu_ps(&uxf[j]), vua);
            const __m128 dh = _mm_mul_ps(d2, v_inv_h);
            const __m128 dc = _mm_mul_ps(d2, v_inv_q);
            const __m128 v = _mm_mul_ps(v_half, _mm_add_ps(_mm_mul_ps(dh, _mm_add_ps(v_two_eh, dh)),
                                                            _mm_mul_ps(dc, _mm_sub_ps(dc, v_two_eq))));
            const __m128i xv = _mm_loadu_si128((const __m128i*)&xs[j]);
            const __m128i okj = _mm_loadu_si128((const __m128i*)&okj2[j]);
            const __m128i differ = _mm_andnot_si128(_mm_cmpeq_epi32(vai, xv), okj);
            const __m128 ok = _mm_and_ps(_mm_and_ps(_mm_cmplt_ps(dh, v_lim_h), _mm_cmplt_ps(_mm_xor_ps(dc, v_sign), v_lim_q)),
                                         _mm_castsi128_ps(differ));
            const __m128 sc = _mm_or_ps(_mm_and_ps(ok, v), _mm_andnot_ps(ok, v_inf));
            _mm_storeu_ps(row + j, sc);
            v_min = _mm_min_ps(v_min, sc);
          }
          row_min(v_min, S + i);
        }
        int arg = 0;
        if (best_row >= 0) {
          const float* row = sc1 + best_row * SP;
          int j = 0;
          while (row[j] != best) ++j;
          arg = (best_row / S) * S * S + (best_row % S) * S + j;
        }
        Step& stp = steps[(size_t)b * K + k];
        stp.good = (double)best < good_lim;
        stp.kind = arg / (S * S);
        stp.slot_i = h * S + (arg % (S * S)) / S;
        stp.slot_j = q * S + arg % S;
        stp.e_i = p[stp.slot_i];
        stp.e_j = p[stp.slot_j];
        stp.new_j = stp.good ? stp.e_i : stp.e_j;
        stp.new_i = (stp.good && stp.kind == 1) ? stp.e_j : stp.e_i;
        stp.e_h = eh;
        stp.cost = slot_cost(cur[stp.slot_j], stp.e_j, stp.new_j) + slot_cost(cur[stp.slot_i], stp.e_i, stp.new_i);
        some |= stp.good;
      }
      if (!some) active[b] = 0;
      any_some |= some;
    }
    if (!any_some) break;
    if (has_budget) {
      // the budget goes first to the pairs whose hot rank stands out most, over all layers
      std::vector<std::pair<int, int>> cand;  // (b, k), layer-major
      DVec pri;
      for (int b : sub)
        for (int k = 0; k < K; ++k) {
          const Step& s = steps[(size_t)b * K + k];
          cand.push_back({b, k});
          pri.push_back(s.good ? s.e_h / scale_all[b] : -kInf);
        }
      std::vector<int> ordr = stable_order((int)cand.size(), [&](int m) { return -pri[m]; });
      int64_t csum = 0;
      bool taking = true;
      bool any_good = false;
      std::vector<uint8_t> chosen(cand.size(), 0);
      for (int m : ordr) {
        const Step& s = steps[(size_t)cand[m].first * K + cand[m].second];
        if (!s.good) continue;
        csum += s.cost;
        taking = taking && csum <= remaining;
        if (taking) chosen[m] = 1;
      }
      for (size_t m = 0; m < cand.size(); ++m) {
        Step& s = steps[(size_t)cand[m].first * K + cand[m].second];
        s.good = s.good && chosen[m];
        any_good |= s.good;
        if (!s.good) {
          s.new_j = s.e_j;
          s.new_i = s.e_i;
        }
      }
      if (!any_good) break;
    }
    int64_t spent = 0;
    for (int b : sub) {
      Step* sb = steps.data() + (size_t)b * K;
      bool some = false;
      for (int k = 0; k < K; ++k) some |= sb[k].good;
      if (!some) continue;
      int64_t* p = bt.p.data() + (int64_t)b * N;
      const double* w = bt.w.data() + (int64_t)b * E;
      const double scale = scale_all[b];
      const double eps = kMinGain * scale;
      std::copy(p, p + N, trial.begin());
      for (int k = 0; k < K; ++k) {
        trial[sb[k].slot_j] = sb[k].new_j;
        trial[sb[k].slot_i] = sb[k].new_i;
      }
      double t_max, t_ss;
      bool t_cov;
      exact_trial(pr, st[b], trial.data(), w, (int64_t)sub.size(), t_max, t_ss, t_cov);
      bool passed = t_cov && t_max <= old_max[b] && t_ss < old_ss[b] - eps * scale;
      int only = -1;  // the pair whose step alone passed
      if (!passed) {
        // the layer's steps fail together: try the first good pair's step alone
        int first = 0;
        while (!sb[first].good) ++first;
        std::copy(p, p + N, trial.begin());
        trial[sb[first].slot_j] = sb[first].new_j;
        trial[sb[first].slot_i] = sb[first].new_i;
        exact_trial(pr, st[b], trial.data(), w, (int64_t)sub.size(), t_max, t_ss, t_cov);
        if (t_cov && t_max <= old_max[b] && t_ss < old_ss[b] - eps * scale) {
          passed = true;
          only = first;
        } else {
          banned[(int64_t)b * N + sb[first].slot_j] = 1;  // its cold slot is set aside
        }
      }
      if (!passed) continue;
      for (int k = 0; k < K; ++k)
        if (sb[k].good && (only < 0 || only == k)) spent += sb[k].cost;
      std::copy(trial.begin(), trial.end(), p);
      compute_state(pr, p, w, st[b], true);
    }
    if (has_budget) remaining -= spent;
  }
}

// ------------------------------------------------------------------ the other phases

// Layers `rows` of the full placement as a batch.
Batch gather(const Prob& pr, const IVec& P, const IVec& CUR, const double* W, const std::vector<int>& rows) {
  Batch bt;
  bt.B = (int)rows.size();
  bt.p.resize((size_t)bt.B * pr.N);
  bt.cur.resize((size_t)bt.B * pr.N);
  bt.w.resize((size_t)bt.B * pr.E);
  for (int i = 0; i < bt.B; ++i) {
    int l = rows[i];
    std::copy(P.begin() + (int64_t)l * pr.N, P.begin() + (int64_t)(l + 1) * pr.N, bt.p.begin() + (int64_t)i * pr.N);
    std::copy(CUR.begin() + (int64_t)l * pr.N, CUR.begin() + (int64_t)(l + 1) * pr.N, bt.cur.begin() + (int64_t)i * pr.N);
    std::copy(W + (int64_t)l * pr.E, W + (int64_t)(l + 1) * pr.E, bt.w.begin() + (int64_t)i * pr.E);
  }
  return bt;
}

int64_t total_moves(const Prob& pr, const Batch& bt) {
  int64_t m = 0;
  for (int b = 0; b < bt.B; ++b) m += moves_row(pr, bt.p.data() + (int64_t)b * pr.N, bt.cur.data() + (int64_t)b * pr.N);
  return m;
}

DVec balances(const Prob& pr, const IVec& P, const double* W, int L) {
  DVec out(L);
  for (int l = 0; l < L; ++l) out[l] = balance_row(pr, P.data() + (int64_t)l * pr.N, W + (int64_t)l * pr.E, L);
  return out;
}

void counts_row(const Prob& pr, const int64_t* p, int64_t* cnt) {
  std::fill(cnt, cnt + pr.E, 0);
  for (int s = 0; s < pr.N; ++s)
    if (p[s] >= 0) ++cnt[p[s]];
}

// planner._repair_by_counts
void repair_by_counts(const Prob& pr, IVec& P, const IVec& START, const IVec& CUR, const double* W, int L) {
  const int E = pr.E, N = pr.N;
  const int64_t live = (int64_t)pr.tgt.size() * pr.S;
  IVec cc((size_t)L * E);
  std::vector<int> sub;
  for (int l = 0; l < L; ++l) {
    counts_row(pr, START.data() + (int64_t)l * N, cc.data() + (int64_t)l * E);
    bool need = false;
    for (int e = 0; e < E; ++e) need |= cc[(int64_t)l * E + e] == 0;
    if (need) sub.push_back(l);
  }
  if (sub.empty()) return;
  Batch q = gather(pr, START, CUR, W, sub);
  IVec c((size_t)q.B * E);
  for (int i = 0; i < q.B; ++i)
    keep_counts_row(cc.data() + (int64_t)sub[i] * E, q.w.data() + (int64_t)i * E, E, live, c.data() + (int64_t)i * E);
  repack_batch(pr, q.B, q.p.data(), q.w.data(), c.data(), DVec(q.B, 1e12), 0);
  for (int i = 0; i < q.B; ++i) {
    int l = sub[i];
    const int64_t* qr = q.p.data() + (int64_t)i * N;
    int64_t* pr_ = P.data() + (int64_t)l * N;
    const int64_t* cr = CUR.data() + (int64_t)l * N;
    bool same_cost = moves_row(pr, qr, cr) <= moves_row(pr, pr_, cr);
    double bq = balance_row(pr, qr, W + (int64_t)l * E, q.B);
    double bp = balance_row(pr, pr_, W + (int64_t)l * E, q.B);
    if (same_cost && bq < bp - 1e-12) std::copy(qr, qr + N, pr_);
  }
}

// planner._reseat_stuck
void reseat_stuck(const Prob& pr, IVec& P, const IVec& START, const IVec& CUR, const double* W, int L, int64_t budget,
                  int64_t lb) {
  const int E = pr.E, N = pr.N, S = pr.S;
  DVec bal = balances(pr, P, W, L);
  const double lim = 1.0 + std::max(1.5 * pr.tol, 0.015);
  std::vector<int> sub;
  IVec moves(L);
  int64_t moves_rest = 0;
  for (int l = 0; l < L; ++l) {
    moves[l] = moves_row(pr, P.data() + (int64_t)l * N, CUR.data() + (int64_t)l * N);
    if (bal[l] > lim) sub.push_back(l);
    else moves_rest += moves[l];
  }
  if (sub.empty()) return;
  const int nb = (int)sub.size();
  const int64_t live = (int64_t)pr.tgt.size() * S;
  Batch q = gather(pr, START, CUR, W, sub);
  IVec cc(E), c((size_t)nb * E);
  for (int i = 0; i < nb; ++i) {
    const double* w = q.w.data() + (int64_t)i * E;
    counts_row(pr, q.p.data() + (int64_t)i * N, cc.data());
    keep_counts_row(cc.data(), w, E, live, c.data() + (int64_t)i * E);
    double mean = np_sum(w, E) / pr.spd_sum;
    restore_counts_row(c.data() + (int64_t)i * E, w, E, 0.5 * mean, S);
  }
  repack_batch(pr, nb, q.p.data(), q.w.data(), c.data(), DVec(nb, 0.0), -1);
  IVec q_moves(nb);
  int64_t q_moves_sum = 0, moves_sub = 0;
  for (int i = 0; i < nb; ++i) {
    q_moves[i] = moves_row(pr, q.p.data() + (int64_t)i * N, q.cur.data() + (int64_t)i * N);
    q_moves_sum += q_moves[i];
    moves_sub += moves[sub[i]];
  }
  const bool has_budget = budget >= 0;
  const int64_t allowed = has_budget ? lb + budget - moves_rest : 0;
  std::vector<uint8_t> take(nb, 0);
  auto q_balance = [&](int i) { return balance_row(pr, q.p.data() + (int64_t)i * N, q.w.data() + (int64_t)i * E, nb); };
  const bool fits = !has_budget || allowed >= q_moves_sum;
  IVec out;  // the full repacks' result, where they fit (empty: P itself)
  IVec q0;   // the repacks without slack, kept for the options below
  if (has_budget) q0 = q.p;
  if (fits) {
    const int64_t sub_budget = has_budget ? allowed - q_moves_sum : -1;
    if (sub_budget != 0 || !has_budget) rebalance(pr, q, sub_budget, has_budget ? 2 : 8);
    if (has_budget) {
      int64_t sub_left = sub_budget - (total_moves(pr, q) - q_moves_sum);
      if (sub_left > 0) rebalance(pr, q, sub_left, 8);
    }
    DVec q_bal(nb);
    for (int i = 0; i < nb; ++i) {
      q_moves[i] = moves_row(pr, q.p.data() + (int64_t)i * N, q.cur.data() + (int64_t)i * N);
      q_bal[i] = q_balance(i);
      take[i] = q_bal[i] < bal[sub[i]] - 1e-12;
    }
    if (has_budget) {
      int64_t spare = allowed - moves_sub;
      DVec eff(nb);
      IVec extra(nb);
      for (int i = 0; i < nb; ++i) {
        extra[i] = q_moves[i] - moves[sub[i]];
        double gain = bal[sub[i]] - q_bal[i];
        eff[i] = extra[i] > 0 ? gain / (double)std::max<int64_t>(extra[i], 1) : kInf;
      }
      std::vector<int> order = stable_order(nb, [&](int i) { return -eff[i]; });
      std::vector<uint8_t> take_now(nb, 0);
      for (int i : order)
        if (take[i] && extra[i] <= spare) {
          take_now[i] = 1;
          spare -= extra[i];
        }
      take = take_now;
    }
    if (!has_budget) {
      for (int i = 0; i < nb; ++i)
        if (take[i])
          std::copy(q.p.begin() + (int64_t)i * N, q.p.begin() + (int64_t)(i + 1) * N, P.begin() + (int64_t)sub[i] * N);
      return;
    }
    out = P;
    for (int i = 0; i < nb; ++i)
      if (take[i])
        std::copy(q.p.begin() + (int64_t)i * N, q.p.begin() + (int64_t)(i + 1) * N, out.begin() + (int64_t)sub[i] * N);
  }
  // under a budget: the repacks at every slack (planner._RESEAT_SLACK), taken by gain per extra
  // move while they fit
  int64_t spare = allowed - moves_sub;
  const int T = (int)(sizeof(kReseatSlack) / sizeof(kReseatSlack[0]));
  const int nt = nb * T, T1 = T - 1, nr = nb * T1;
  Batch base = gather(pr, START, CUR, W, sub);
  // the slacks past the first are repacked here, as one batch of [layer, slack] rows
  IVec rp((size_t)nr * N), rc((size_t)nr * E);
  DVec rw((size_t)nr * E), taus(nr);
  for (int i = 0; i < nb; ++i)
    for (int t = 0; t < T1; ++t) {
      const int k = i * T1 + t;
      std::copy(base.p.begin() + (int64_t)i * N, base.p.begin() + (int64_t)(i + 1) * N, rp.begin() + (int64_t)k * N);
      std::copy(base.w.begin() + (int64_t)i * E, base.w.begin() + (int64_t)(i + 1) * E, rw.begin() + (int64_t)k * E);
      std::copy(c.begin() + (int64_t)i * E, c.begin() + (int64_t)(i + 1) * E, rc.begin() + (int64_t)k * E);
      taus[k] = kReseatSlack[t + 1];
    }
  repack_batch(pr, nr, rp.data(), rw.data(), rc.data(), taus, 0);  // no bumps
  Batch qt;
  qt.B = nt;
  qt.p.resize((size_t)nt * N);
  qt.cur.resize((size_t)nt * N);
  qt.w.resize((size_t)nt * E);
  for (int i = 0; i < nb; ++i)
    for (int t = 0; t < T; ++t) {
      const int k = i * T + t;
      const int64_t* src = t == 0 ? q0.data() + (int64_t)i * N : rp.data() + (int64_t)(i * T1 + t - 1) * N;
      std::copy(src, src + N, qt.p.begin() + (int64_t)k * N);
      std::copy(base.cur.begin() + (int64_t)i * N, base.cur.begin() + (int64_t)(i + 1) * N, qt.cur.begin() + (int64_t)k * N);
      std::copy(base.w.begin() + (int64_t)i * E, base.w.begin() + (int64_t)(i + 1) * E, qt.w.begin() + (int64_t)k * E);
    }
  IVec qm_t(nt), extra_t(nt);
  DVec gain_t(nt);
  for (int k = 0; k < nt; ++k) {
    const int i = k / T;
    qm_t[k] = moves_row(pr, qt.p.data() + (int64_t)k * N, qt.cur.data() + (int64_t)k * N);
    extra_t[k] = qm_t[k] - moves[sub[i]];
    gain_t[k] = bal[sub[i]] - balance_row(pr, qt.p.data() + (int64_t)k * N, qt.w.data() + (int64_t)k * E, nt);
  }
  std::vector<int> pick(nb, -1);
  DVec g_now(nb, 0.0);
  IVec x_now(nb, 0);
  for (;;) {
    double best = -kInf;
    int kb = -1;
    for (int k = 0; k < nt; ++k) {
      const int i = k / T;
      const double dg = gain_t[k] - g_now[i];
      const int64_t dx = extra_t[k] - x_now[i];
      if (!(dg > 1e-12 && dx <= spare)) continue;
      const double ratio = dx > 0 ? dg / (double)std::max<int64_t>(dx, 1) : kInf;
      if (ratio > best) {
        best = ratio;
        kb = k;
      }
    }
    if (kb < 0) break;
    const int i = kb / T;
    spare -= extra_t[kb] - x_now[i];
    pick[i] = kb % T;
    g_now[i] = gain_t[kb];
    x_now[i] = extra_t[kb];
  }
  std::vector<int> ci;
  for (int i = 0; i < nb; ++i)
    if (pick[i] >= 0) ci.push_back(i);
  if (ci.empty()) {
    if (fits) P = out;
    return;
  }
  Batch qc;
  qc.B = (int)ci.size();
  int64_t qm_ci = 0;
  for (int i : ci) {
    const int k = i * T + pick[i];
    qc.p.insert(qc.p.end(), qt.p.begin() + (int64_t)k * N, qt.p.begin() + (int64_t)(k + 1) * N);
    qc.cur.insert(qc.cur.end(), qt.cur.begin() + (int64_t)k * N, qt.cur.begin() + (int64_t)(k + 1) * N);
    qc.w.insert(qc.w.end(), qt.w.begin() + (int64_t)k * E, qt.w.begin() + (int64_t)(k + 1) * E);
    qm_ci += qm_t[k];
  }
  rebalance(pr, qc, spare, 2);
  spare -= total_moves(pr, qc) - qm_ci;
  if (spare > 0) rebalance(pr, qc, spare, 8);
  if (fits) {
    // the better of the two over the stuck layers (sums of their balances, as numpy's)
    DVec b_out(nb), b_alt(nb);
    IVec alt_rows(P.begin(), P.end());
    for (size_t m = 0; m < ci.size(); ++m)
      std::copy(qc.p.begin() + (int64_t)m * N, qc.p.begin() + (int64_t)(m + 1) * N, alt_rows.begin() + (int64_t)sub[ci[m]] * N);
    for (int i = 0; i < nb; ++i) {
      const double* w = W + (int64_t)sub[i] * E;
      b_out[i] = balance_row(pr, out.data() + (int64_t)sub[i] * N, w, nb);
      b_alt[i] = balance_row(pr, alt_rows.data() + (int64_t)sub[i] * N, w, nb);
    }
    if (!(np_sum(b_alt.data(), nb) < np_sum(b_out.data(), nb) - 1e-12)) {
      P = out;
      return;
    }
    P = alt_rows;
    return;
  }
  for (size_t m = 0; m < ci.size(); ++m)
    std::copy(qc.p.begin() + (int64_t)m * N, qc.p.begin() + (int64_t)(m + 1) * N, P.begin() + (int64_t)sub[ci[m]] * N);
}

// planner._descend: the descent on each layer's most loaded rank from the repaired placement
// (uniform rank speed, under a budget), then the choice per layer between its plan and a point
// of its descent by gain per move. The reference runs the layers in rounds; each layer's descent
// depends on that layer alone, so here each runs to its end in turn.
struct DescentStep {
  int sj, nj, si, ni;  // slot j takes expert nj; on a swap slot si takes ni (si < 0: none)
};

double row_peak(const Prob& pr, const int64_t* p, const double* w, DVec& rl, IVec& cnt) {
  rank_loads_row(pr, p, w, rl.data(), cnt.data());
  double mx = -kInf;
  for (int r : pr.tgt) mx = std::max(mx, rl[r]);
  return mx;
}

void descend(const Prob& pr, IVec& P, const IVec& REPAIRED, const IVec& CUR, const double* W, int L, int64_t budget,
             int64_t lb) {
  const int E = pr.E, N = pr.N, S = pr.S, R = pr.R, E1 = E + 1;
  if (budget <= 0 || budget < 2 * lb || pr.tgt.size() < 2 || !pr.uniform) return;
  const int T = (int)pr.tgt.size();
  DVec rl(R);
  IVec cnt(E);
  // the state of the layer's placement q, kept up to date step by step: a step changes the
  // replica counts of two experts at most, so only the ranks holding them (and the two ranks it
  // touches) change load; each such rank's load is summed again over its slots, as the reference
  // sums it from scratch, so every value is the reference's to the bit
  IVec cnti(E1);
  DVec u(E1), rise(E1), slot_u(N), load(R);
  std::vector<std::vector<int>> hl(E);  // the slots of each expert
  std::vector<int> rank_of(N);
  for (int s = 0; s < N; ++s) rank_of[s] = s / S;
  std::vector<int> idx(N);
  std::vector<uint8_t> hc((size_t)R * E1), mark(R);
  const int kpart = std::min<int>(kDescentPartners, T - 1);
  std::vector<int> order(T);
  std::vector<int> a(S), anow(S);
  DVec ua(S), up(S), newh0(S);
  // per partner slot: its expert, its rank's load, its load per replica, the evicted expert's
  // most loaded host after a replicate, whether a step may use it, its cost terms
  const int PS = kpart * S;
  std::vector<int> pj(PS), px(PS), prk(PS), io(S);
  std::vector<uint8_t> pel0(PS), pel1(PS);
  DVec plq(PS), pux(PS), plqu(PS), pxpk(PS), pmul0(PS), rmq(kpart), rmx(kpart), rlo(kpart), rhi(kpart), rm0(kpart);
  std::vector<int> plj(PS), rlj(kpart);
  IVec q(N);
  const int64_t avg = (budget + L - 1) / L;
  const int64_t add = avg + avg / 2 + 4;
  std::vector<std::vector<DescentStep>> steps(L);
  std::vector<IVec> hist_m(L);
  std::vector<DVec> hist_b(L);
  DVec mean(L), peak_p(L);  // the mean load and the earlier phases' peak of each layer
  static const double kMult[5] = {2.0, 2.0, 2.0, 1.0, 0.5};
  auto isort = [](std::vector<int>& v, auto less) {  // stable, no buffer
    for (size_t k = 1; k < v.size(); ++k) {
      const int x = v[k];
      size_t m = k;
      for (; m > 0 && less(x, v[m - 1]); --m) v[m] = v[m - 1];
      v[m] = x;
    }
  };
  auto before = [&](int r1, int r2) { return load[r1] < load[r2] || (load[r1] == load[r2] && r1 < r2); };
  for (int l = 0; l < L; ++l) {
    const double* w = W + (int64_t)l * E;
    const int64_t* cur = CUR.data() + (int64_t)l * N;
    mean[l] = np_sum(w, E) / pr.spd_sum;
    const double eps = kMinGain * std::max(mean[l], 1e-300);
    const double lim = (1.0 + pr.tol) * mean[l];
    std::copy(REPAIRED.begin() + (int64_t)l * N, REPAIRED.begin() + (int64_t)(l + 1) * N, q.begin());
    int64_t moves_now = moves_row(pr, q.data(), cur);
    const int64_t cap = moves_now + add;
    double peak_now = row_peak(pr, q.data(), w, rl, cnt);
    hist_m[l].push_back(moves_now);
    auto bal = [&](double pk) { return mean[l] > 0 ? pk / mean[l] : 1.0; };
    hist_b[l].push_back(bal(peak_now));
    peak_p[l] = row_peak(pr, P.data() + (int64_t)l * N, w, rl, cnt);
    // only the layers that the earlier phases left off balance descend
    if (!(peak_now > lim && moves_now < cap) || !(peak_p[l] > lim)) continue;
    // the state from scratch
    std::fill(cnti.begin(), cnti.end(), 0);
    std::fill(hc.begin(), hc.end(), 0);
    for (int e = 0; e < E; ++e) hl[e].clear();
    for (int s = 0; s < N; ++s) {
      idx[s] = q[s] < 0 ? E : (int)q[s];
      ++cnti[idx[s]];
      if (idx[s] < E) {
        ++hc[(size_t)(s / S) * E1 + idx[s]];
        hl[idx[s]].push_back(s);
      }
    }
    cnti[E] = 0;
    auto set_u = [&](int e) {
      u[e] = w[e] / std::max(1.0, (double)cnti[e]);
      const double cx = (double)cnti[e];
      rise[e] = cx >= 2.0 ? w[e] / (cx - 1.0) - u[e] : 0.0;
    };
    for (int e = 0; e < E; ++e) set_u(e);
    u[E] = 0.0;
    rise[E] = 0.0;
    for (int s = 0; s < N; ++s) slot_u[s] = u[idx[s]];
    for (int r = 0; r < R; ++r) load[r] = np_sum(slot_u.data() + (int64_t)r * S, S);
    for (int k = 0; k < T; ++k) order[k] = pr.tgt[k];
    while (true) {
      // partners: the coldest target ranks (ties to the lower rank id); the order of the step
      // before is nearly sorted, so insertion sort
      for (int k = 1; k < T; ++k) {
        const int v = order[k];
        int m = k - 1;
        while (m >= 0 && before(v, order[m])) {
          order[m + 1] = order[m];
          --m;
        }
        order[m + 1] = v;
      }
      int h = -1;
      double pk = -kInf;
      for (int r : pr.tgt)
        if (h < 0 || load[r] > pk) {
          pk = load[r];
          h = r;
        }
      // each expert's most loaded host, from its slots
      auto host_max = [&](int e) {
        double m = -kInf;
        for (int s2 : hl[e]) m = std::max(m, load[rank_of[s2]]);
        return m;
      };
      // the partner slots, rank by rank from the coldest
      int np = 0;
      double minux = kInf;
      for (int k1 = 0; k1 < kpart; ++k1) {
        const int r = order[k1];
        for (int j = r * S; j < r * S + S; ++j) {
          const int x = idx[j];
          const bool ok = r != h && !(x < E && hc[(size_t)h * E1 + x]);
          pj[np] = j;
          px[np] = x;
          prk[np] = r;
          plq[np] = load[r];
          pux[np] = slot_u[j];
          plqu[np] = load[r] - slot_u[j];
          pxpk[np] = x < E && cnti[x] >= 2 ? host_max(x) + rise[x] : -kInf;  // replicates only
          pel0[np] = ok && (x == E || cnti[x] >= 2);
          pel1[np] = ok && x < E;
          pmul0[np] = q[j] == cur[j] ? 1.0 : 2.0;  // a replicate's multiplier is at most this
          plj[np] = q[j] == cur[j] ? 1 : -1;        // and slot_cost(cur[j], q[j], .) at least this
          if (x < E) minux = std::min(minux, slot_u[j]);
          ++np;
        }
        // bounds per rank over its slots that a step may use
        double mq = kInf, mx = kInf, lo = kInf, hi = -kInf, mm = 0.0;
        int lj = 2;
        for (int k = np - S; k < np; ++k) {
          if (pel0[k]) {
            mq = std::min(mq, plqu[k]);
            mx = std::min(mx, pxpk[k]);
            mm = std::max(mm, pmul0[k]);
          }
          if (pel1[k]) {
            lo = std::min(lo, pux[k]);
            hi = std::max(hi, pux[k]);
            lj = std::min(lj, plj[k]);
          }
        }
        rm0[k1] = mm;
        rlj[k1] = lj;
        rmq[k1] = mq;
        rmx[k1] = mx;
        rlo[k1] = lo;
        rhi[k1] = hi;
      }
      for (int i = 0; i < S; ++i) {
        const int64_t v = q[h * S + i];
        anow[i] = (int)v;
        a[i] = v < 0 ? E : (int)v;
        ua[i] = u[a[i]];
        const double wa = a[i] < E ? w[a[i]] : 0.0;
        up[i] = wa / ((double)cnti[a[i]] + 1.0);
      }
      for (int i = 0; i < S; ++i) {
        int nah = 0;
        for (int i2 = 0; i2 < S; ++i2) nah += a[i2] == a[i];
        newh0[i] = pk - (double)nah * (ua[i] - up[i]);
      }
      // The reference scores every [kind, i, j] and takes the first maximum. Here the candidates
      // are visited from the most promising (slots of h by their bound, partner ranks from the
      // coldest) and skipped wherever an upper bound of their score cannot reach the best so far;
      // a tie goes to the lower (i, j), so the choice is the reference's. A score is g times a
      // multiplier of at most 2, bounded per slot and rank by which slots are changed already. A
      // swap has g <= (pk - load[r]) / 2 and g <= ua[i] - ux (up to rounding: the margin covers
      // it); a replicate of a[i] has g <= pk - newh0[i], and matters only if it scores at least
      // the best swap (kind 0 first on ties).
      // a candidate (i, j) whose score is at most `bound` can still be chosen
      auto reach = [](double bound, double best, int bi, int bj, int i, int j) {
        return bound > best || (bound == best && bi >= 0 && (i < bi || (i == bi && j < bj)));
      };
      const double margin = 1e-12 * std::fabs(pk);
      auto mult = [](int64_t c) { return kMult[std::min<int64_t>(std::max<int64_t>(c, -2), 2) + 2]; };
      double best0 = -kInf, best1 = -kInf;
      int bi0 = -1, bj0 = -1, bi1 = -1, bj1 = -1;
      // swaps first (nearly every step is one): the best swap, the first on ties
      for (int i = 0; i < S; ++i) io[i] = i;
      isort(io, [&](int x, int y) { return ua[x] > ua[y]; });
      for (int i : io) {
        const int ai = a[i];
        if (ai >= E) continue;
        const int64_t ci_cur = cur[h * S + i];
        const int li = anow[i] == ci_cur ? 1 : -1;  // the least slot_cost of h's slot i
        if (!reach(2.0 * (ua[i] - minux + margin), best1, bi1, bj1, i, -1)) continue;
        for (int k0 = 0, k1 = 0; k0 < np; k0 += S, ++k1) {
          if ((pk - plq[k0]) + margin < best1) break;  // the ranks come from the coldest
          // g <= d and g <= pk - load[r] - d (up to rounding), d = ua[i] - ux over the rank's slots
          const double rb2 =
              mult(rlj[k1] + li) *
              (std::min(0.5 * (pk - plq[k0]), std::min(ua[i] - rlo[k1], (pk - plq[k0]) - (ua[i] - rhi[k1]))) + margin);
          if (!reach(rb2, best1, bi1, bj1, i, prk[k0] * S)) continue;
          if (hc[(size_t)prk[k0] * E1 + ai]) continue;
          for (int k = k0; k < k0 + S; ++k) {
            if (!pel1[k] || px[k] == ai) continue;
            const double d = ua[i] - pux[k];
            const double g = pk - std::max(pk - d, plq[k] + d);
            const int j = pj[k];
            if (!(g > eps) || !reach(mult(plj[k] + li) * g, best1, bi1, bj1, i, j)) continue;
            const double sc = g * mult(slot_cost(cur[j], q[j], anow[i]) + slot_cost(ci_cur, anow[i], q[j]));
            if (bi1 < 0 || reach(sc, best1, bi1, bj1, i, j)) {
              best1 = sc;
              bi1 = i;
              bj1 = j;
            }
          }
        }
      }
      // then replicates: one is taken only if it scores at least the best swap (kind 0 first on
      // ties), so the bounds start from there
      double m0 = 0.0;
      for (int k1 = 0; k1 < kpart; ++k1) m0 = std::max(m0, rm0[k1]);
      const double floor0 = bi1 >= 0 ? best1 : -kInf;
      for (int i = 0; i < S; ++i) io[i] = i;
      isort(io, [&](int x, int y) { return newh0[x] < newh0[y]; });
      for (int i : io) {
        const int ai = a[i];
        if (ai >= E) continue;
        const double ib = m0 * (pk - newh0[i]);
        if (ib < floor0 || !reach(ib, best0, bi0, bj0, i, -1)) continue;
        for (int k0 = 0, k1 = 0; k0 < np; k0 += S, ++k1) {
          const double rb = rm0[k1] * (pk - std::max(std::max(newh0[i], rmq[k1] + up[i]), rmx[k1]));
          if (!(rb >= floor0) || !reach(rb, best0, bi0, bj0, i, prk[k0] * S)) continue;
          if (hc[(size_t)prk[k0] * E1 + ai]) continue;
          for (int k = k0; k < k0 + S; ++k) {
            if (!pel0[k] || px[k] == ai) continue;
            const double g = pk - std::max(std::max(newh0[i], plqu[k] + up[i]), pxpk[k]);
            const int j = pj[k];
            if (!(g > eps) || pmul0[k] * g < floor0 || !reach(pmul0[k] * g, best0, bi0, bj0, i, j)) continue;
            const double sc = g * mult(slot_cost(cur[j], q[j], anow[i]));
            if (sc >= floor0 && (bi0 < 0 || reach(sc, best0, bi0, bj0, i, j))) {
              best0 = sc;
              bi0 = i;
              bj0 = j;
            }
          }
        }
      }
      int bk = -1, bi = -1, bj = -1;
      if (bi0 >= 0 && !(bi1 >= 0 && best1 > best0)) {
        bk = 0;
        bi = bi0;
        bj = bj0;
      } else if (bi1 >= 0) {
        bk = 1;
        bi = bi1;
        bj = bj1;
      }
      if (bk < 0) break;
      // the step, applied in place (a step that fails the exact check ends the layer, and its
      // state is not used again)
      const int ea = anow[bi], ex = (int)q[bj];
      const int xe = ex < 0 ? E : ex;
      const int rj = bj / S, si = h * S + bi;
      auto moved = [&](int s) { return (int64_t)(q[s] != cur[s] && q[s] >= 0); };
      int64_t dm = -moved(bj);
      q[bj] = ea;
      idx[bj] = ea;
      dm += moved(bj);
      ++hc[(size_t)rj * E1 + ea];
      if (xe < E) --hc[(size_t)rj * E1 + xe];
      std::fill(mark.begin(), mark.end(), 0);
      mark[rj] = 1;
      if (bk == 1) {
        dm -= moved(si);
        q[si] = ex;
        idx[si] = xe;
        dm += moved(si);
        --hc[(size_t)h * E1 + ea];
        ++hc[(size_t)h * E1 + xe];
        slot_u[bj] = u[ea];
        slot_u[si] = u[xe];
        mark[h] = 1;
        *std::find(hl[ea].begin(), hl[ea].end(), si) = bj;
        *std::find(hl[xe].begin(), hl[xe].end(), bj) = si;
      } else {
        ++cnti[ea];
        set_u(ea);
        if (xe < E) {
          --cnti[xe];
          set_u(xe);
        }
        hl[ea].push_back(bj);
        for (int s2 : hl[ea]) {
          slot_u[s2] = u[ea];
          mark[rank_of[s2]] = 1;
        }
        if (xe < E) {
          hl[xe].erase(std::find(hl[xe].begin(), hl[xe].end(), bj));
          for (int s2 : hl[xe]) {
            slot_u[s2] = u[xe];
            mark[rank_of[s2]] = 1;
          }
        }
        slot_u[bj] = u[ea];
      }
      for (int r = 0; r < R; ++r)
        if (mark[r]) load[r] = np_sum(slot_u.data() + (int64_t)r * S, S);
      double t_pk = -kInf;
      for (int r : pr.tgt) t_pk = std::max(t_pk, load[r]);
      if (!(t_pk <= pk)) break;
      peak_now = t_pk;
      moves_now += dm;
      steps[l].push_back({bj, ea, bk == 1 ? si : -1, ex});
      hist_m[l].push_back(moves_now);
      hist_b[l].push_back(bal(peak_now));
      if (!(peak_now > lim && moves_now < cap)) break;
    }
  }
  bool any = false;
  for (int l = 0; l < L; ++l) any = any || !steps[l].empty();
  if (!any) return;
  IVec m_l(L);
  DVec b_l(L);
  int64_t spare = lb + budget;
  for (int l = 0; l < L; ++l) {
    const int64_t* pl = P.data() + (int64_t)l * N;
    m_l[l] = moves_row(pr, pl, CUR.data() + (int64_t)l * N);
    b_l[l] = mean[l] > 0 ? peak_p[l] / mean[l] : 1.0;
    spare -= m_l[l];
  }
  std::vector<int> pick(L, -1);
  DVec g_now(L, 0.0);
  IVec x_now(L, 0);
  // each layer's best option under the spare moves now (the first on ties); while the spare
  // shrinks, a layer's best stays its best as long as it fits and the layer is not changed
  std::vector<int> best_t(L, -1);
  DVec best_r(L, -kInf);
  auto layer_best = [&](int l) {
    best_t[l] = -1;
    best_r[l] = -kInf;
    for (size_t t = 0; t < hist_m[l].size(); ++t) {
      const double dg = (b_l[l] - hist_b[l][t]) - g_now[l];
      const int64_t dx = (hist_m[l][t] - m_l[l]) - x_now[l];
      if (!(dg > 1e-12 && dx <= spare)) continue;
      const double ratio = dx > 0 ? dg / (double)std::max<int64_t>(dx, 1) : kInf;
      if (ratio > best_r[l]) {
        best_r[l] = ratio;
        best_t[l] = (int)t;
      }
    }
  };
  for (int l = 0; l < L; ++l) layer_best(l);
  for (;;) {
    double bestr = -kInf;
    int bl = -1;
    for (int l = 0; l < L; ++l) {
      if (best_t[l] >= 0 && (hist_m[l][best_t[l]] - m_l[l]) - x_now[l] > spare) layer_best(l);
      if (best_t[l] >= 0 && best_r[l] > bestr) {
        bestr = best_r[l];
        bl = l;
      }
    }
    if (bl < 0) break;
    const int bt = best_t[bl];
    const int64_t ex = hist_m[bl][bt] - m_l[bl];
    const bool freed = ex < x_now[bl];
    spare -= ex - x_now[bl];
    pick[bl] = bt;
    g_now[bl] = b_l[bl] - hist_b[bl][bt];
    x_now[bl] = ex;
    if (freed) {  // a cheaper point gives moves back: every layer may afford more
      for (int l = 0; l < L; ++l) layer_best(l);
    } else {
      layer_best(bl);
    }
  }
  for (int l = 0; l < L; ++l) {
    if (pick[l] < 0) continue;
    int64_t* pl = P.data() + (int64_t)l * N;
    std::copy(REPAIRED.begin() + (int64_t)l * N, REPAIRED.begin() + (int64_t)(l + 1) * N, pl);
    for (int t = 0; t < pick[l]; ++t) {
      const DescentStep& st = steps[l][t];
      pl[st.sj] = st.nj;
      if (st.si >= 0) pl[st.si] = st.ni;
    }
  }
}

// planner._fill_in_order for one row (from the start placement)
void fill_in_order_row(const Prob& pr, int64_t* p, bool prefer_empty) {
  const int E = pr.E, N = pr.N, S = pr.S;
  IVec cnt(E + 1);
  auto count = [&]() {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int s = 0; s < N; ++s) ++cnt[p[s] < 0 ? E : p[s]];
  };
  count();
  std::vector<int> missing;
  for (int e = 0; e < E; ++e)
    if (cnt[e] == 0) missing.push_back(e);
  // Filling a slot only ever takes a slot's emptiness or its expert's spare replica away, so
  // the first empty and the first legal target slot never move back: two forward scans.
  int se = 0, sl = 0;
  auto is_empty = [&](int s) { return pr.target[s / S] && p[s] < 0; };
  auto is_legal = [&](int s) { return pr.target[s / S] && (p[s] < 0 || cnt[p[s] < 0 ? E : p[s]] >= 2); };
  for (int e : missing) {
    while (se < N && !is_empty(se)) ++se;
    while (sl < N && !is_legal(sl)) ++sl;
    const int t_empty = se < N ? se : -1, t_legal = sl < N ? sl : -1;
    int t = (prefer_empty && t_empty >= 0) ? t_empty : std::max(t_legal, 0);
    --cnt[p[t] < 0 ? E : p[t]];
    ++cnt[e];
    p[t] = e;
  }
}

}  // namespace

// The whole replan core; see elasticep/eplb/planner.py:_plan_reference for the steps.
py::tuple plan_core(py::array_t<int64_t, py::array::c_style | py::array::forcecast> cur_a,
                    py::array_t<double, py::array::c_style | py::array::forcecast> w_a,
                    py::array_t<bool, py::array::c_style | py::array::forcecast> target_a,
                    py::array_t<double, py::array::c_style | py::array::forcecast> speed_a, int S, int64_t budget,
                    double tolerance) {
  if (cur_a.ndim() != 2 || w_a.ndim() != 2 || target_a.ndim() != 1 || speed_a.ndim() != 1)
    throw py::value_error("plan_core: cur [L, N], w [L, E], target [R], speed [R]");
  const int L = (int)cur_a.shape(0), N = (int)cur_a.shape(1), E = (int)w_a.shape(1);
  const int R = (int)target_a.shape(0);
  if (S <= 0 || N != R * S || w_a.shape(0) != L || speed_a.shape(0) != R)
    throw py::value_error("plan_core: inconsistent shapes");
  Prob pr;
  pr.E = E;
  pr.R = R;
  pr.S = S;
  pr.N = N;
  pr.tol = tolerance;
  pr.target.resize(R);
  pr.speed.resize(R);
  auto ta = target_a.unchecked<1>();
  auto sa = speed_a.unchecked<1>();
  DVec tspeed;
  for (int r = 0; r < R; ++r) {
    pr.target[r] = ta(r);
    pr.speed[r] = sa(r);
    if (ta(r)) {
      pr.tgt.push_back(r);
      tspeed.push_back(sa(r));
    }
    pr.uniform = pr.uniform && sa(r) == 1.0;
  }
  if (pr.tgt.empty()) throw py::value_error("plan_core: no target rank");
  pr.spd_sum = np_sum(tspeed.data(), (int64_t)tspeed.size());
  pr.spd_max = *std::max_element(pr.speed.begin(), pr.speed.end());
  pr.spd_min = *std::min_element(pr.speed.begin(), pr.speed.end());
  const double* W = w_a.data();
  IVec CUR(cur_a.data(), cur_a.data() + (size_t)L * N);
  IVec START(CUR);
  for (int l = 0; l < L; ++l)
    for (int s = 0; s < N; ++s)
      if (!pr.target[s / S]) START[(int64_t)l * N + s] = -1;
  IVec P, REPAIRED;
  int64_t lb = 0;
  {
    py::gil_scoped_release nogil;
    P = START;
    for (int l = 0; l < L; ++l) lb += repair_row(pr, P.data() + (int64_t)l * N, W + (int64_t)l * E);
    if (lb) repair_by_counts(pr, P, START, CUR, W, L);
    REPAIRED = P;
    std::vector<int> all(L);
    std::iota(all.begin(), all.end(), 0);
    auto run = [&](const IVec& from, int64_t bud, int pairs) {
      Batch bt = gather(pr, from, CUR, W, all);
      rebalance(pr, bt, bud, pairs);
      return bt.p;
    };
    auto moved = [&](const IVec& X) {
      int64_t m = 0;
      for (int l = 0; l < L; ++l) m += moves_row(pr, X.data() + (int64_t)l * N, CUR.data() + (int64_t)l * N);
      return m;
    };
    if (budget < 0) {
      P = run(P, -1, 8);
    } else {
      P = run(P, std::min(budget, 2 * lb), 2);
      int64_t left = budget - (moved(P) - lb);
      if (left > 0) {
        P = run(P, left, 8);
        left = budget - (moved(P) - lb);
      }
      if (left > budget / 20) {
        IVec wide = run(REPAIRED, budget, 8);
        if (np_mean(balances(pr, wide, W, L)) < np_mean(balances(pr, P, W, L)) - 1e-12) P = wide;
      }
    }
    reseat_stuck(pr, P, START, CUR, W, L, budget, lb);
    descend(pr, P, REPAIRED, CUR, W, L, budget, lb);
    for (bool prefer_empty : {true, false}) {
      for (int l = 0; l < L; ++l) {
        IVec plain(START.begin() + (int64_t)l * N, START.begin() + (int64_t)(l + 1) * N);
        fill_in_order_row(pr, plain.data(), prefer_empty);
        int64_t* pl = P.data() + (int64_t)l * N;
        const double* w = W + (int64_t)l * E;
        if (balance_row(pr, plain.data(), w, L) < balance_row(pr, pl, w, L) - 1e-12) std::copy(plain.begin(), plain.end(), pl);
      }
    }
  }
  // the plan's balances as planner.replan computes them (mean over layers) and its coverage
  double before, after;
  bool covered = true;
  {
    py::gil_scoped_release nogil;
    before = np_mean(balances(pr, REPAIRED, W, L));
    after = np_mean(balances(pr, P, W, L));
    IVec cnt(E);
    for (int l = 0; l < L && covered; ++l) {
      counts_row(pr, P.data() + (int64_t)l * N, cnt.data());
      for (int e = 0; e < E; ++e) covered = covered && cnt[e] > 0;
    }
  }
  py::array_t<int64_t> p_out({L, N}), r_out({L, N});
  std::copy(P.begin(), P.end(), p_out.mutable_data());
  std::copy(REPAIRED.begin(), REPAIRED.end(), r_out.mutable_data());
  return py::make_tuple(p_out, r_out, lb, before, after, covered);
}

void register_eplb_planner(py::module_& m) {
  m.def("eplb_plan_core", &plan_core, py::arg("cur"), py::arg("load"), py::arg("target"), py::arg("speed"),
        py::arg("slots_per_rank"), py::arg("budget"), py::arg("tolerance"),
        "The replan core of elasticep.eplb.planner in C++: (placement [L, N], repaired [L, N], lower bound, "
        "balance of repaired, balance of placement, every expert covered). budget < 0 means no budget.");
}

#else

void register_eplb_planner(py::module_&) {}

#endif  // __SSE2__

}  // namespace elasticep
