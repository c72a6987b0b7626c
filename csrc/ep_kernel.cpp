// CPU expert-parallel dispatch/combine through POSIX shared memory, with bounded waits.
//
// Segment layout (one per cluster id and view epoch, every offset 64-byte aligned, every return
// region page aligned so that a rank can map its own region a second time):
//
//   SegmentHeader
//   Doorbell[num_ranks]                      one futex word per receiving rank
//   RegionGen[num_ranks]                     bumped by a rank before it rewrites its return region
//   Mailbox[2 phases][src][dst]              stamp (epoch << 32 | call seq), rows, dtype, region gen
//   send rows[src]                           [max_tokens][hidden]: row t = x[t] of src's dispatch
//   dispatch meta[src][dst]                  [max_tokens][1 + topk] int32: token, local slot per k
//   combine meta[owner][src]                 [max_tokens * topk] uint64: byte offset of each
//                                            expert-output row in the owner's return region
//   return region[owner]                     [num_ranks * max_tokens * topk][hidden]
//
// Dispatch copies each token row once into the sender's send rows, however many ranks it goes
// to; each receiver copies the rows it wants straight from there into recv_x. Combine moves no
// rows at all when the expert outputs already lie in the owner's return region (recv_x lives
// there whenever it fits, and an expert computed in place writes its outputs there); otherwise
// the owner copies them into its region once. Either way the source reduces straight from the
// owners' regions. Rows a rank sends itself never go through the segment: they are read in place
// from x or expert_out.
//
// Channels (meta, mailboxes) are written by exactly one rank and read by exactly one, so no locks
// are needed: the writer fills the data, then publishes the mailbox stamp with a release store;
// once all of a phase's messages are out it rings the readers' doorbells. One buffer each
// suffices because of causality: src rewrites its send rows and meta for dispatch n+1 only after
// its combine n has received every dst's combine n message, which dst sends only after it has
// read all of dispatch n; an owner rewrites its return region (dispatch n+1 unpack, or the copy in
// combine n+1) only after every active source has posted dispatch n+1, i.e. finished combine n.
// A peer that was marked inactive can still be reading late; what it then reads from send rows is
// at worst garbage in outputs that only the rank that gave up on it would consume (and it ignores
// them), and a late read of a return region is caught by the region generation (a seqlock): the
// reader re-checks the generation the owner posted after it has reduced, and on a mismatch drops
// that owner exactly as if it had timed out. So no rank ever returns data overwritten under it.
//
// Waiting: a receiver polls its mailboxes briefly (up to spin_us, 0 when there are more ranks than
// cores), then sleeps on its doorbell with FUTEX_WAIT bounded by the call's deadline. Senders
// only issue FUTEX_WAKE when the receiver sleeps and the message is the last one it waits for. Nothing ever spins
// without bound: eight ranks share two cores on the machines this runs on in CI.

#include "ep_kernel.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <pybind11/stl.h>

namespace py = pybind11;

namespace elasticep {
namespace {

constexpr uint64_t kMagic = 0x5045434954534c45ULL;  // "ELSTICEP" little-endian
constexpr uint32_t kLayoutVersion = 4;
constexpr size_t kAlign = 64;
constexpr size_t kPage = 4096;  // return regions start on a page: mmap offsets must
// Polls before a waiter sleeps on its doorbell, each after a short pause (a few microseconds in
// all). Small on purpose: with more ranks than cores the peer we wait for usually needs our core.
// No sched_yield: on a loaded host it sends the waiter to the back of the run queue for many
// milliseconds, while a futex sleeper is woken with the scheduler's wake-up preference.
constexpr int kPollsBeforeSleep = 8;
constexpr int kPausesPerPoll = 16;
// Default bound on polling before sleeping when ranks <= cores, us: a futex sleep and wake-up
// costs tens of microseconds, more on a busy host, and a peer on another core often posts sooner.
constexpr int64_t kAutoSpinUs = 50;
// Longest single futex sleep. The deadline bounds the total; this only makes a waiter re-read
// the mask periodically, so a peer zeroed by another thread of the caller stops being waited on.
constexpr int64_t kMaxSleepNs = 10'000'000;
// Bound on waiting for another rank to finish initialising a freshly created segment header.
constexpr int64_t kAttachTimeoutNs = 5'000'000'000;

enum Phase : int { kDispatch = 0, kCombine = 1 };
enum DType : uint32_t { kFloat32 = 0, kBFloat16 = 1 };

struct SegmentHeader {
  std::atomic<uint32_t> init_state;  // 0 fresh (ftruncate zeroes it), 1 initialising, 2 ready
  uint32_t layout_version;
  uint64_t magic;
  uint32_t num_ranks;
  uint32_t slots_per_rank;
  uint32_t max_tokens;
  uint32_t hidden;
  uint32_t topk;
  uint32_t creator_epoch;
  uint64_t total_bytes;
  std::atomic<uint32_t> attached;  // ranks mapped right now; the last to close unlinks
};

struct alignas(kAlign) Doorbell {
  std::atomic<uint32_t> ring;      // bumped by every sender; the futex word
  std::atomic<uint32_t> sleepers;  // > 0 while the owner may be in FUTEX_WAIT
  std::atomic<uint32_t> target;    // the ring value at which the sleeping owner wants waking
};

struct alignas(kAlign) Mailbox {
  std::atomic<uint64_t> stamp;  // (epoch << 32) | seq, 0 = never written
  uint32_t rows;
  uint32_t dtype;
  uint64_t region_gen;  // combine: the sender's region generation its offsets refer to
};

// A return region's generation: the owner bumps it (a full barrier) before it rewrites any row.
struct alignas(kAlign) RegionGen {
  std::atomic<uint64_t> gen;
};

static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared-memory atomics must be lock-free");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");

constexpr size_t align_up(size_t v) { return (v + kAlign - 1) / kAlign * kAlign; }
constexpr size_t page_up(size_t v) { return (v + kPage - 1) / kPage * kPage; }

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}

inline int32_t load_mask(const int32_t* active, int peer) {
  return __atomic_load_n(active + peer, __ATOMIC_ACQUIRE);
}

inline void clear_mask(int32_t* active, int peer) { __atomic_store_n(active + peer, 0, __ATOMIC_RELEASE); }

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

// Row kernels of the combine reduction, float32. Built twice, for AVX2 and for the baseline ISA,
// and picked at load time. AVX2 without FMA on purpose: a fused multiply-add rounds once where
// w * y + acc rounds twice, and the sum must not depend on the host.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EP_ROW_KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define EP_ROW_KERNEL
#endif

EP_ROW_KERNEL void row_first(float* __restrict acc, const float* __restrict y0, float w0, int H) {
  for (int h = 0; h < H; ++h) acc[h] = w0 * y0[h];
}

EP_ROW_KERNEL void row_first2(float* __restrict acc, const float* __restrict y0, float w0, const float* __restrict y1,
                              float w1, int H) {
  for (int h = 0; h < H; ++h) acc[h] = w0 * y0[h] + w1 * y1[h];
}

EP_ROW_KERNEL void row_add2(float* __restrict acc, const float* __restrict ya, float wa, const float* __restrict yb,
                            float wb, int H) {
  for (int h = 0; h < H; ++h) acc[h] = (acc[h] + wa * ya[h]) + wb * yb[h];
}

EP_ROW_KERNEL void row_add(float* __restrict acc, const float* __restrict ya, float wa, int H) {
  for (int h = 0; h < H; ++h) acc[h] += wa * ya[h];
}

int futex_wait(std::atomic<uint32_t>* word, uint32_t expected, int64_t timeout_ns) {
  struct timespec ts;
  ts.tv_sec = timeout_ns / 1'000'000'000;
  ts.tv_nsec = timeout_ns % 1'000'000'000;
  // Not FUTEX_PRIVATE: the word lives in memory shared between processes.
  return static_cast<int>(
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAIT, expected, &ts, nullptr, 0));
}

void futex_wake_all(std::atomic<uint32_t>* word) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), FUTEX_WAKE, INT32_MAX, nullptr, nullptr, 0);
}

struct PeerTimeoutRecord {
  int peer;
  std::string op;
  int layer;
  int64_t waited_us;
};

}  // namespace

// One rank's view of the shared segment, and the routing state of its last dispatch.
class KernelRuntime {
 public:
  KernelRuntime(int rank, int num_ranks, int slots_per_rank, int max_tokens, int hidden, int topk,
                int64_t epoch, std::string shm_name, int64_t spin_us)
      : rank_(rank),
        num_ranks_(num_ranks),
        slots_per_rank_(slots_per_rank),
        max_tokens_(max_tokens),
        hidden_(hidden),
        topk_(topk),
        epoch_(epoch),
        shm_name_(std::move(shm_name)) {
    if (num_ranks < 1 || num_ranks > 1024) throw std::invalid_argument("num_ranks must be in [1, 1024]");
    if (rank < 0 || rank >= num_ranks) throw std::invalid_argument("rank must be in [0, num_ranks)");
    if (slots_per_rank < 1) throw std::invalid_argument("slots_per_rank must be >= 1");
    if (max_tokens < 1) throw std::invalid_argument("max_tokens must be >= 1");
    if (hidden < 1) throw std::invalid_argument("hidden must be >= 1");
    if (topk < 1) throw std::invalid_argument("topk must be >= 1");
    if (epoch < 0 || epoch > 0xffffffffLL) throw std::invalid_argument("epoch must fit in 32 bits");
    if (shm_name_.empty() || shm_name_[0] != '/' || shm_name_.find('/', 1) != std::string::npos ||
        shm_name_.size() > 250)
      throw std::invalid_argument("shm_name must look like '/name' (one leading slash, <= 250 chars)");
    // Spinning only pays when every rank can hold a core; with more ranks than cores the peer
    // we would spin for usually needs ours.
    if (spin_us < 0) spin_us = num_ranks <= static_cast<int>(std::thread::hardware_concurrency()) ? kAutoSpinUs : 0;
    spin_ns_ = spin_us * 1000;
    compute_layout();
    attach();
    got_dispatch_.assign(num_ranks_, 0);
    sent_dispatch_.assign(num_ranks_, 0);
    sent_rows_.assign(num_ranks_, 0);
    recv_records_.resize(num_ranks_);
    counts_.assign(slots_per_rank_, 0);
    wait_pending_.reset(new std::atomic<uint8_t>[num_ranks_]);
    for (int p = 0; p < num_ranks_; ++p) wait_pending_[p].store(0);
  }

  ~KernelRuntime() { close(); }

  KernelRuntime(const KernelRuntime&) = delete;
  KernelRuntime& operator=(const KernelRuntime&) = delete;

  // Drops the mapping; the last rank attached unlinks the segment name.
  void close() {
    if (base_ == nullptr) return;
    if (header()->attached.fetch_sub(1, std::memory_order_acq_rel) == 1) shm_unlink(shm_name_.c_str());
    munmap(base_, total_bytes_);
    base_ = nullptr;
    state_ = State::kClosed;
  }

  // Phase one of dispatch: posts this rank's tokens to every active rank, waits (bounded) for every
  // active peer's tokens and returns the number of rows each local slot received.
  std::vector<int64_t> dispatch_send_wait(uintptr_t x_ptr, int64_t tokens, int dtype, uintptr_t topk_ptr,
                                          uintptr_t active_ptr, int64_t timeout_us, int layer) {
    require_open();
    if (state_ == State::kDispatched || state_ == State::kWaited)
      throw std::runtime_error("dispatch called again before combine of the previous dispatch");
    if (tokens < 0 || tokens > max_tokens_)
      throw std::invalid_argument("tokens = " + std::to_string(tokens) + " outside [0, max_tokens = " +
                                  std::to_string(max_tokens_) + "]");
    if (dtype != kFloat32 && dtype != kBFloat16) throw std::invalid_argument("dtype code must be 0 or 1");
    if (timeout_us < 0) throw std::invalid_argument("timeout_us must be >= 0");
    if ((tokens > 0 && (x_ptr == 0 || topk_ptr == 0)) || active_ptr == 0)
      throw std::invalid_argument("null tensor pointer");
    const auto* x = reinterpret_cast<const uint8_t*>(x_ptr);
    const auto* topk = reinterpret_cast<const int64_t*>(topk_ptr);
    auto* active = reinterpret_cast<int32_t*>(active_ptr);
    const int64_t num_slots = static_cast<int64_t>(num_ranks_) * slots_per_rank_;
    for (int64_t i = 0; i < tokens * topk_; ++i) {
      const int64_t slot = topk[i];
      if (slot < -1 || slot >= num_slots)
        throw std::invalid_argument("topk_idx[" + std::to_string(i / topk_) + ", " + std::to_string(i % topk_) +
                                    "] = " + std::to_string(slot) + " is not -1 or a slot in [0, " +
                                    std::to_string(num_slots) + ")");
    }

    ++seq_;
    ++dispatch_calls_;
    x_ = x;
    last_timeouts_.clear();
    tokens_ = tokens;
    dtype_ = static_cast<uint32_t>(dtype);
    const size_t row_bytes = row_bytes_for(dtype_);
    topk_copy_.assign(topk, topk + tokens * topk_);
    comb_row_.assign(static_cast<size_t>(tokens * topk_), -1);
    wanted_.assign(static_cast<size_t>(tokens), 0);
    const uint64_t want = stamp_for(seq_);

    // Meta for every active destination (self included: one code path builds the routing), then
    // each row that some other rank wants goes into the send rows once, at its token index.
    uint8_t* send = send_rows(rank_);
    for (int dst = 0; dst < num_ranks_; ++dst) {
      sent_dispatch_[dst] = 0;
      if (dst != rank_ && load_mask(active, dst) == 0) continue;
      int32_t* meta = dispatch_meta(rank_, dst);
      int32_t rows = 0, combine_rows = 0;
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t* row_slots = topk + t * topk_;
        bool routed_here = false;
        for (int k = 0; k < topk_; ++k) routed_here |= row_slots[k] >= 0 && row_slots[k] / slots_per_rank_ == dst;
        if (!routed_here) continue;
        int32_t* m = meta + static_cast<size_t>(rows) * (1 + topk_);
        m[0] = static_cast<int32_t>(t);
        for (int k = 0; k < topk_; ++k) {
          const int64_t slot = row_slots[k];
          if (slot >= 0 && slot / slots_per_rank_ == dst) {
            m[1 + k] = static_cast<int32_t>(slot % slots_per_rank_);
            comb_row_[t * topk_ + k] = combine_rows++;
          } else {
            m[1 + k] = -1;
          }
        }
        if (dst != rank_) wanted_[t] = 1;
        ++rows;
      }
      sent_dispatch_[dst] = 1;
      sent_rows_[dst] = static_cast<uint32_t>(rows);
    }
    // Rows for this rank itself stay in x: dispatch_unpack reads them from there.
    for (int64_t t = 0; t < tokens; ++t)
      if (wanted_[t]) std::memcpy(send + static_cast<size_t>(t) * row_bytes, x + static_cast<size_t>(t) * row_bytes, row_bytes);
    for (int dst = 0; dst < num_ranks_; ++dst)
      if (sent_dispatch_[dst]) post(kDispatch, dst, sent_rows_[dst], want, 0);
    ring_posted(sent_dispatch_);

    // Wait for every active peer's tokens addressed to this rank.
    std::fill(got_dispatch_.begin(), got_dispatch_.end(), 0);
    got_dispatch_[rank_] = 1;
    wait_peers(kDispatch, want, active, timeout_us, "dispatch", layer, got_dispatch_);

    std::fill(counts_.begin(), counts_.end(), 0);
    for (int src = 0; src < num_ranks_; ++src) {
      if (!got_dispatch_[src]) continue;
      const Mailbox* mb = mailbox(kDispatch, src, rank_);
      if (mb->dtype != dtype_) {
        state_ = State::kIdle;
        throw std::invalid_argument("rank " + std::to_string(src) + " dispatched " + dtype_name(mb->dtype) +
                                    " rows but this rank dispatched " + dtype_name(dtype_));
      }
      const int32_t* meta = dispatch_meta(src, rank_);
      const uint32_t rows = std::min<uint32_t>(mb->rows, static_cast<uint32_t>(max_tokens_));
      for (uint32_t r = 0; r < rows; ++r)
        for (int k = 0; k < topk_; ++k) {
          const int32_t e = meta[static_cast<size_t>(r) * (1 + topk_) + 1 + k];
          if (e >= 0 && e < slots_per_rank_) ++counts_[e];
        }
    }
    state_ = State::kWaited;
    return std::vector<int64_t>(counts_.begin(), counts_.end());
  }

  // dispatch_send_wait, then, when recv_x ([slots_per_rank, capacity, hidden], slot stride =
  // capacity) fits in this rank's return region as mapped by the caller (set_region_alias),
  // dispatch_unpack into it, in one call. Writes the row count of each local slot into
  // counts_ptr ([slots_per_rank] int64) and returns (capacity, unpacked); when not unpacked
  // (no alias, or too many rows) the caller picks a buffer and calls dispatch_unpack itself.
  std::pair<int64_t, bool> dispatch(uintptr_t x_ptr, int64_t tokens, int dtype, uintptr_t topk_ptr,
                                    uintptr_t active_ptr, int64_t timeout_us, int layer, uintptr_t counts_ptr) {
    if (counts_ptr == 0) throw std::invalid_argument("null tensor pointer");
    dispatch_send_wait(x_ptr, tokens, dtype, topk_ptr, active_ptr, timeout_us, layer);
    auto* counts = reinterpret_cast<int64_t*>(counts_ptr);
    int64_t capacity = 0;
    for (int e = 0; e < slots_per_rank_; ++e) {
      counts[e] = counts_[e];
      capacity = std::max<int64_t>(capacity, counts_[e]);
    }
    const size_t need = static_cast<size_t>(slots_per_rank_) * capacity * row_bytes_for(dtype_);
    if (region_alias_ == 0 || need > region_bytes_) return {capacity, false};
    dispatch_unpack(region_alias_, capacity, capacity);
    return {capacity, true};
  }

  // Phase two of dispatch: copies the received rows into recv_x
  // ([slots_per_rank, capacity, hidden], rows of slot e at [e, :counts[e]], slot e starting
  // slot_stride rows after slot e - 1), ordered by source rank, source token, top-k position.
  void dispatch_unpack(uintptr_t recv_ptr, int64_t capacity, int64_t slot_stride) {
    require_open();
    if (state_ != State::kWaited) throw std::runtime_error("dispatch_unpack needs a preceding dispatch_send_wait");
    const int64_t need = counts_.empty() ? 0 : *std::max_element(counts_.begin(), counts_.end());
    if (capacity < need)
      throw std::invalid_argument("capacity " + std::to_string(capacity) + " < largest slot count " +
                                  std::to_string(need));
    if (slot_stride < capacity) throw std::invalid_argument("slot_stride must be >= capacity");
    if (recv_ptr == 0 && need > 0) throw std::invalid_argument("null tensor pointer");
    auto* recv = reinterpret_cast<uint8_t*>(recv_ptr);
    const size_t row_bytes = row_bytes_for(dtype_);
    // recv_x may lie in this rank's return region, which late readers of the last combine check.
    if (in_region(recv_ptr, capacity, slot_stride, row_bytes))
      region_gen(rank_)->gen.fetch_add(1, std::memory_order_seq_cst);
    std::vector<int32_t> fill(slots_per_rank_, 0);
    for (int src = 0; src < num_ranks_; ++src) {
      auto& records = recv_records_[src];
      records.clear();
      if (!got_dispatch_[src]) continue;
      const Mailbox* mb = mailbox(kDispatch, src, rank_);
      const int32_t* meta = dispatch_meta(src, rank_);
      const uint8_t* data = send_rows(src);
      const uint32_t rows = std::min<uint32_t>(mb->rows, static_cast<uint32_t>(max_tokens_));
      for (uint32_t r = 0; r < rows; ++r) {
        const int32_t* m = meta + static_cast<size_t>(r) * (1 + topk_);
        if (m[0] < 0 || m[0] >= (src == rank_ ? tokens_ : max_tokens_)) continue;  // never from a sound peer
        // x_ is still alive: EPBuffer.dispatch holds it across both phases.
        const uint8_t* row = (src == rank_ ? x_ : data) + static_cast<size_t>(m[0]) * row_bytes;
        for (int k = 0; k < topk_; ++k) {
          const int32_t e = m[1 + k];
          if (e < 0 || e >= slots_per_rank_ || fill[e] >= capacity) continue;
          const int32_t pos = fill[e]++;
          uint8_t* dst = recv + (static_cast<size_t>(e) * slot_stride + pos) * row_bytes;
          std::memcpy(dst, row, row_bytes);
          // A second slot of this rank copies from the first copy, which is in this core's cache.
          row = dst;
          records.emplace_back(e, pos);
        }
      }
    }
    x_ = nullptr;
    capacity_ = capacity;
    state_ = State::kDispatched;
  }

  // Sends each received row's expert output back to its source rank, waits (bounded) for the
  // outputs of this rank's own tokens and writes out[t] = sum_k w[t, k] * y[t, k] over the top-k
  // positions whose slot's rank answered (others contribute nothing).
  void combine(uintptr_t expert_out_ptr, int64_t capacity, int64_t slot_stride, uintptr_t weights_ptr, uintptr_t topk_ptr,
               int64_t tokens, uintptr_t out_ptr, uintptr_t active_ptr, int64_t timeout_us, int layer) {
    require_open();
    if (state_ != State::kDispatched) throw std::runtime_error("combine needs a completed dispatch");
    if (tokens != tokens_)
      throw std::invalid_argument("combine got " + std::to_string(tokens) + " tokens, dispatch had " +
                                  std::to_string(tokens_));
    if (capacity != capacity_)
      throw std::invalid_argument("expert_out capacity " + std::to_string(capacity) + " != dispatched " +
                                  std::to_string(capacity_));
    if (slot_stride < capacity) throw std::invalid_argument("slot_stride must be >= capacity");
    if (timeout_us < 0) throw std::invalid_argument("timeout_us must be >= 0");
    if (active_ptr == 0 || (tokens > 0 && (weights_ptr == 0 || topk_ptr == 0 || out_ptr == 0)))
      throw std::invalid_argument("null tensor pointer");
    const auto* topk = reinterpret_cast<const int64_t*>(topk_ptr);
    if (tokens > 0 && std::memcmp(topk, topk_copy_.data(), topk_copy_.size() * sizeof(int64_t)) != 0)
      throw std::invalid_argument("topk_idx differs from the one passed to dispatch");
    const bool has_rows = std::any_of(recv_records_.begin(), recv_records_.end(), [](auto& r) { return !r.empty(); });
    if (expert_out_ptr == 0 && has_rows) throw std::invalid_argument("null tensor pointer");
    const auto* expert_out = reinterpret_cast<const uint8_t*>(expert_out_ptr);
    const auto* weights = reinterpret_cast<const float*>(weights_ptr);
    auto* out = reinterpret_cast<uint8_t*>(out_ptr);
    auto* active = reinterpret_cast<int32_t*>(active_ptr);
    const size_t row_bytes = row_bytes_for(dtype_);
    const uint64_t want = stamp_for(seq_);
    ++combine_calls_;
    last_timeouts_.clear();

    // Tell every source whose tokens arrived where the expert output of each of its rows lies in
    // this rank's return region, in the order that source numbered them (token, then top-k
    // position). Outputs already there (recv_x, or an expert computed in place) are not moved;
    // others are copied there once. Own rows are read in place below.
    const size_t span = slots_per_rank_ > 0 && capacity > 0
                            ? ((static_cast<size_t>(slots_per_rank_) - 1) * slot_stride + capacity) * row_bytes
                            : 0;
    const bool zero_copy = span == 0 || in_region(expert_out_ptr, capacity, slot_stride, row_bytes);
    const uint8_t* rows_from = expert_out;
    std::vector<uint8_t> detached;
    if (!zero_copy) {
      if (overlaps_region(expert_out_ptr, span)) {
        // Partly inside the region: the copy below could overwrite rows it has yet to read.
        detached.assign(expert_out, expert_out + span);
        rows_from = detached.data();
      }
      region_gen(rank_)->gen.fetch_add(1, std::memory_order_seq_cst);
    }
    const uint64_t gen = region_gen(rank_)->gen.load(std::memory_order_relaxed);
    uint8_t* own_region = region(rank_);
    const size_t alias_delta = zero_copy ? expert_out_ptr - region_alias_ : 0;
    size_t staged = 0;  // rows copied into the region so far
    std::vector<uint8_t> posted(num_ranks_, 0);
    for (int src = 0; src < num_ranks_; ++src) {
      if (!got_dispatch_[src]) continue;
      if (src != rank_ && load_mask(active, src) == 0) continue;
      const auto& records = recv_records_[src];
      uint64_t* offsets = combine_meta(rank_, src);
      for (size_t i = 0; i < records.size() && src != rank_; ++i) {
        const size_t at = (static_cast<size_t>(records[i].first) * slot_stride + records[i].second) * row_bytes;
        if (zero_copy) {
          offsets[i] = alias_delta + at;
        } else {
          std::memcpy(own_region + staged * row_bytes, rows_from + at, row_bytes);
          offsets[i] = staged++ * row_bytes;
        }
      }
      post(kCombine, src, static_cast<uint32_t>(records.size()), want, gen);
      posted[src] = 1;
    }
    ring_posted(posted);

    // Wait for the owners this rank sent tokens to.
    std::vector<uint8_t> got(num_ranks_, 0);
    got[rank_] = 1;
    for (int o = 0; o < num_ranks_; ++o)
      if (!sent_dispatch_[o]) got[o] = 2;  // never asked: not waited on, contributes nothing
    wait_peers(kCombine, want, active, timeout_us, "combine", layer, got);
    const int64_t reduce_start = now_ns();

    // Reduce; then make sure no owner rewrote its region while we read it (it only does so after
    // it gave up on this rank). Such an owner is dropped like one that timed out, and the
    // reduction is redone without it, so the result never mixes in overwritten rows.
    for (;;) {
      reduce_into(out, tokens, topk, weights, rows_from, slot_stride, row_bytes, got);
      std::atomic_thread_fence(std::memory_order_acquire);
      bool redo = false;
      for (int o = 0; o < num_ranks_; ++o) {
        if (o == rank_ || got[o] != 1) continue;
        if (region_gen(o)->gen.load(std::memory_order_relaxed) == mailbox(kCombine, o, rank_)->region_gen) continue;
        got[o] = 0;
        clear_mask(active, o);
        last_timeouts_.push_back({o, "combine", layer, (now_ns() - reduce_start) / 1000});
        ++overwritten_reads_;
        redo = true;
      }
      if (!redo) break;
    }
    state_ = State::kIdle;
  }

  // out[t] = sum_k w[t, k] * y[t, k] over the top-k positions whose owner has got[owner] == 1:
  // own rows from expert_out, others from the owners' return regions.
  void reduce_into(uint8_t* out, int64_t tokens, const int64_t* topk, const float* weights, const uint8_t* expert_out,
                   int64_t slot_stride, size_t row_bytes, const std::vector<uint8_t>& got) {
    // Weighted sum in top-k order, accumulated in float32 (in the output row itself for float32).
    // Contributions are added two per pass over the row, keeping the sequential order
    // ((w0*y0 + w1*y1) + w2*y2) + w3*y3: the same float operations as adding them one at a time.
    std::vector<float> scratch(hidden_);
    std::vector<const uint8_t*> ys(topk_);
    std::vector<const float*> yf(topk_);
    std::vector<float> ws(topk_);
    const int H = hidden_;
    for (int64_t t = 0; t < tokens; ++t) {
      int n = 0;
      for (int k = 0; k < topk_; ++k) {
        const int64_t slot = topk[t * topk_ + k];
        const int32_t r = comb_row_[t * topk_ + k];
        if (slot < 0 || r < 0) continue;
        const int owner = static_cast<int>(slot / slots_per_rank_);
        if (got[owner] != 1) continue;
        if (owner == rank_) {
          if (static_cast<size_t>(r) >= recv_records_[rank_].size()) continue;
          const auto& rec = recv_records_[rank_][r];
          ys[n] = expert_out + (static_cast<size_t>(rec.first) * slot_stride + rec.second) * row_bytes;
        } else {
          const uint32_t rows = mailbox(kCombine, owner, rank_)->rows;
          if (static_cast<uint32_t>(r) >= rows || static_cast<size_t>(r) >= combine_rows_max()) continue;
          const uint64_t off = combine_meta(owner, rank_)[r];
          if (off > region_bytes_ - row_bytes) continue;  // never from a sound peer
          ys[n] = region(owner) + off;
        }
        ws[n++] = weights[t * topk_ + k];
      }
      uint8_t* o = out + static_cast<size_t>(t) * row_bytes;
      if (dtype_ == kFloat32) {
        float* __restrict acc = reinterpret_cast<float*>(o);
        if (n == 0) {
          std::fill(acc, acc + H, 0.0f);
          continue;
        }
        for (int i = 0; i < n; ++i) yf[i] = reinterpret_cast<const float*>(ys[i]);
        const float* const* y = yf.data();
        int j = 1;
        if (n == 1) {
          row_first(acc, y[0], ws[0], H);
        } else {
          row_first2(acc, y[0], ws[0], y[1], ws[1], H);
          j = 2;
        }
        for (; j + 1 < n; j += 2) row_add2(acc, y[j], ws[j], y[j + 1], ws[j + 1], H);
        if (j < n) row_add(acc, y[j], ws[j], H);
      } else {
        float* acc = scratch.data();
        std::fill(acc, acc + H, 0.0f);
        for (int i = 0; i < n; ++i) {
          const auto* yb = reinterpret_cast<const uint16_t*>(ys[i]);
          const float w = ws[i];
          if (i == 0) {
            for (int h = 0; h < H; ++h) acc[h] = w * bf16_to_f32(yb[h]);
          } else {
            for (int h = 0; h < H; ++h) acc[h] += w * bf16_to_f32(yb[h]);
          }
        }
        auto* ob = reinterpret_cast<uint16_t*>(o);
        for (int h = 0; h < H; ++h) ob[h] = f32_to_bf16(acc[h]);
      }
    }
  }

  // (peer, op, layer, waited_us, since_ns) for every peer that the dispatch or combine in progress
  // on another thread has waited on for at least min_us and still waits on; empty when no call
  // waits. since_ns (CLOCK_MONOTONIC) names the wait. Lock-free: it only reads the atomics the
  // waiting thread publishes, and rereads the wait's start to discard a wait that ended meanwhile.
  std::vector<std::tuple<int, std::string, int, int64_t, int64_t>> waiting(int64_t min_us) const {
    std::vector<std::tuple<int, std::string, int, int64_t, int64_t>> out;
    const int64_t since = wait_start_ns_.load();
    if (since == 0) return out;
    const int64_t waited_us = (now_ns() - since) / 1000;
    if (waited_us < min_us) return out;
    const int phase = wait_phase_.load(), layer = wait_layer_.load();
    for (int p = 0; p < num_ranks_; ++p)
      if (wait_pending_[p].load() != 0)
        out.emplace_back(p, phase == kDispatch ? "dispatch" : "combine", layer, waited_us, since);
    if (wait_start_ns_.load() != since) out.clear();
    return out;
  }

  // (peer, op, layer, waited_us) for every peer that timed out in the last dispatch or combine.
  std::vector<std::tuple<int, std::string, int, int64_t>> last_timeouts() const {
    std::vector<std::tuple<int, std::string, int, int64_t>> out;
    for (const auto& r : last_timeouts_) out.emplace_back(r.peer, r.op, r.layer, r.waited_us);
    return out;
  }

  py::dict stats() const {
    py::dict d;
    d["dispatch_calls"] = dispatch_calls_;
    d["combine_calls"] = combine_calls_;
    d["peer_timeouts"] = peer_timeouts_;
    d["refused_stale_epoch"] = refused_stale_epoch_;
    d["overwritten_reads"] = overwritten_reads_;
    d["seq"] = seq_;
    return d;
  }

  size_t last_timeout_count() const { return last_timeouts_.size(); }
  uint64_t refused_stale_epoch() const { return refused_stale_epoch_; }
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int slots_per_rank() const { return slots_per_rank_; }
  int max_tokens() const { return max_tokens_; }
  int hidden() const { return hidden_; }
  int topk() const { return topk_; }
  int64_t epoch() const { return epoch_; }
  const std::string& shm_name() const { return shm_name_; }
  uint64_t seq() const { return seq_; }
  size_t segment_bytes() const { return total_bytes_; }
  size_t region_offset() const { return region_off_ + static_cast<size_t>(rank_) * region_bytes_; }
  size_t region_bytes() const { return region_bytes_; }
  uintptr_t region_alias() const { return region_alias_; }
  std::pair<uint64_t, uint64_t> segment_file_id() const { return {segment_dev_, segment_ino_}; }

  // Declares where the caller mapped this rank's return region (region_offset(), region_bytes()
  // of the same segment) in its own address space; recv_x and expert_out found there are the
  // region itself. 0 forgets it.
  void set_region_alias(uintptr_t ptr) {
    require_open();
    region_alias_ = ptr;
  }
  bool closed() const { return base_ == nullptr; }

 private:
  enum class State { kIdle, kWaited, kDispatched, kClosed };

  void compute_layout() {
    const size_t R = num_ranks_;
    size_t off = align_up(sizeof(SegmentHeader));
    doorbell_off_ = off;
    off += align_up(sizeof(Doorbell) * R);
    gen_off_ = off;
    off += align_up(sizeof(RegionGen) * R);
    mailbox_off_ = off;
    off += align_up(sizeof(Mailbox) * 2 * R * R);
    // Rows are sized for float32 so one segment serves both dtypes.
    const size_t row_max = static_cast<size_t>(hidden_) * 4;
    send_bytes_ = align_up(static_cast<size_t>(max_tokens_) * row_max);
    send_off_ = off;
    off += send_bytes_ * R;
    dmeta_bytes_ = align_up(static_cast<size_t>(max_tokens_) * (1 + topk_) * sizeof(int32_t));
    dmeta_off_ = off;
    off += dmeta_bytes_ * R * R;
    // Every top-k position of a token can name a slot of the same rank (even the same slot twice).
    const size_t combine_rows = static_cast<size_t>(max_tokens_) * topk_;
    cmeta_bytes_ = align_up(combine_rows * sizeof(uint64_t));
    cmeta_off_ = off;
    off += cmeta_bytes_ * R * R;
    // A rank receives at most one row per (source, token, top-k position); recv_x, laid out
    // [slots_per_rank, largest slot count], gets twice that so that uneven routing still fits
    // (tmpfs only backs the pages that are touched).
    region_rows_ = 2 * R * combine_rows;
    region_bytes_ = page_up(region_rows_ * row_max);
    off = page_up(off);
    region_off_ = off;
    off += region_bytes_ * R;
    total_bytes_ = off;
  }

  // Opens or creates the segment; whoever wins the header's init CAS writes the layout, the
  // others wait for it (bounded) and check that they agree on it.
  void attach() {
    int fd = shm_open(shm_name_.c_str(), O_CREAT | O_RDWR, 0600);
    if (fd < 0) throw std::runtime_error("shm_open(" + shm_name_ + "): " + std::strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
      ::close(fd);
      throw std::runtime_error("fstat(" + shm_name_ + "): " + std::strerror(errno));
    }
    if (st.st_size == 0 && ftruncate(fd, static_cast<off_t>(total_bytes_)) != 0) {
      const int err = errno;
      ::close(fd);
      throw std::runtime_error("ftruncate(" + shm_name_ + "): " + std::strerror(err));
    }
    if (fstat(fd, &st) != 0 || static_cast<size_t>(st.st_size) != total_bytes_) {
      ::close(fd);
      throw std::invalid_argument("shared segment " + shm_name_ + " exists with " + std::to_string(st.st_size) +
                                  " bytes but this layout needs " + std::to_string(total_bytes_) +
                                  " (ranks disagree on num_ranks/slots_per_rank/max_tokens/hidden/topk, or a "
                                  "stale segment: unlink it)");
    }
    void* p = mmap(nullptr, total_bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    segment_dev_ = static_cast<uint64_t>(st.st_dev);
    segment_ino_ = static_cast<uint64_t>(st.st_ino);
    ::close(fd);
    if (p == MAP_FAILED) throw std::runtime_error(std::string("mmap: ") + std::strerror(errno));
    base_ = static_cast<uint8_t*>(p);

    SegmentHeader* h = header();
    uint32_t fresh = 0;
    if (h->init_state.compare_exchange_strong(fresh, 1, std::memory_order_acq_rel)) {
      h->layout_version = kLayoutVersion;
      h->magic = kMagic;
      h->num_ranks = num_ranks_;
      h->slots_per_rank = slots_per_rank_;
      h->max_tokens = max_tokens_;
      h->hidden = hidden_;
      h->topk = topk_;
      h->creator_epoch = static_cast<uint32_t>(epoch_);
      h->total_bytes = total_bytes_;
      h->init_state.store(2, std::memory_order_release);
    } else {
      const int64_t deadline = now_ns() + kAttachTimeoutNs;
      while (h->init_state.load(std::memory_order_acquire) != 2) {
        if (now_ns() > deadline) {
          munmap(base_, total_bytes_);
          base_ = nullptr;
          throw std::runtime_error("shared segment " + shm_name_ + " was never initialised (creator died?)");
        }
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      const bool same = h->magic == kMagic && h->layout_version == kLayoutVersion &&
                        h->num_ranks == static_cast<uint32_t>(num_ranks_) &&
                        h->slots_per_rank == static_cast<uint32_t>(slots_per_rank_) &&
                        h->max_tokens == static_cast<uint32_t>(max_tokens_) &&
                        h->hidden == static_cast<uint32_t>(hidden_) && h->topk == static_cast<uint32_t>(topk_) &&
                        h->total_bytes == total_bytes_;
      if (!same) {
        munmap(base_, total_bytes_);
        base_ = nullptr;
        throw std::invalid_argument("shared segment " + shm_name_ +
                                    " was created with a different layout (num_ranks, slots_per_rank, "
                                    "max_tokens, hidden or topk differ)");
      }
    }
    h->attached.fetch_add(1, std::memory_order_acq_rel);
    state_ = State::kIdle;
  }

  size_t combine_rows_max() const { return static_cast<size_t>(max_tokens_) * topk_; }

  // Whether the rows of a [slots_per_rank, slot_stride, hidden] tensor at ptr (capacity rows per
  // slot used) all lie in this rank's return region as aliased by the caller.
  bool in_region(uintptr_t ptr, int64_t capacity, int64_t slot_stride, size_t row_bytes) const {
    if (region_alias_ == 0 || capacity <= 0 || ptr < region_alias_) return false;
    const size_t span = ((static_cast<size_t>(slots_per_rank_) - 1) * slot_stride + capacity) * row_bytes;
    const size_t start = ptr - region_alias_;
    return start % row_bytes == 0 && start <= region_bytes_ && span <= region_bytes_ - start;
  }

  bool overlaps_region(uintptr_t ptr, size_t span) const {
    return region_alias_ != 0 && ptr < region_alias_ + region_bytes_ && ptr + span > region_alias_;
  }

  void require_open() const {
    if (base_ == nullptr) throw std::runtime_error("kernel runtime is closed");
  }

  SegmentHeader* header() const { return reinterpret_cast<SegmentHeader*>(base_); }
  Doorbell* doorbell(int r) const { return reinterpret_cast<Doorbell*>(base_ + doorbell_off_) + r; }
  Mailbox* mailbox(int phase, int src, int dst) const {
    return reinterpret_cast<Mailbox*>(base_ + mailbox_off_) +
           (static_cast<size_t>(phase) * num_ranks_ + src) * num_ranks_ + dst;
  }
  RegionGen* region_gen(int r) const { return reinterpret_cast<RegionGen*>(base_ + gen_off_) + r; }
  uint8_t* send_rows(int src) const { return base_ + send_off_ + static_cast<size_t>(src) * send_bytes_; }
  int32_t* dispatch_meta(int src, int dst) const {
    return reinterpret_cast<int32_t*>(base_ + dmeta_off_ +
                                      (static_cast<size_t>(src) * num_ranks_ + dst) * dmeta_bytes_);
  }
  uint64_t* combine_meta(int owner, int src) const {
    return reinterpret_cast<uint64_t*>(base_ + cmeta_off_ +
                                       (static_cast<size_t>(owner) * num_ranks_ + src) * cmeta_bytes_);
  }
  uint8_t* region(int owner) const { return base_ + region_off_ + static_cast<size_t>(owner) * region_bytes_; }

  size_t row_bytes_for(uint32_t dtype) const { return static_cast<size_t>(hidden_) * (dtype == kFloat32 ? 4 : 2); }
  static std::string dtype_name(uint32_t d) {
    return d == kFloat32 ? "float32" : d == kBFloat16 ? "bfloat16" : "dtype#" + std::to_string(d);
  }
  uint64_t stamp_for(uint64_t seq) const {
    return (static_cast<uint64_t>(epoch_) << 32) | (seq & 0xffffffffULL);
  }

  // Publishes this rank's message of `phase` to `dst`. The doorbell is rung later, by
  // ring_posted(), once every message of the phase is out: a woken receiver may preempt us, and
  // on a crowded host we might not get the core back for a while.
  void post(int phase, int dst, uint32_t rows, uint64_t stamp, uint64_t gen) {
    Mailbox* mb = mailbox(phase, rank_, dst);
    mb->rows = rows;
    mb->dtype = dtype_;
    mb->region_gen = gen;
    mb->stamp.store(stamp, std::memory_order_release);
  }

  // Rings the doorbell of every peer marked in `posted` and wakes those that sleep.
  void ring_posted(const std::vector<uint8_t>& posted) {
    for (int dst = 0; dst < num_ranks_; ++dst) {
      if (dst == rank_ || !posted[dst]) continue;
      Doorbell* bell = doorbell(dst);
      const uint32_t ring = bell->ring.fetch_add(1, std::memory_order_seq_cst) + 1;
      // Wake the owner only when it can have everything it waits for: with R ranks this is one
      // wake-up per phase instead of R - 1, each of which costs a core on a crowded host.
      if (bell->sleepers.load(std::memory_order_seq_cst) > 0 &&
          static_cast<int32_t>(ring - bell->target.load(std::memory_order_seq_cst)) >= 0)
        futex_wake_all(&bell->ring);
    }
  }

  // Waits until every peer p with got[p] == 0 and active[p] != 0 has posted `want` in `phase`
  // to this rank (then got[p] = 1), or until timeout_us has passed since the call; each peer
  // still missing then is marked 0 in `active`, recorded, and left at got[p] = 0. A message from
  // another epoch is refused (counted once per message) and the wait goes on.
  void wait_peers(int phase, uint64_t want, int32_t* active, int64_t timeout_us, const char* op, int layer,
                  std::vector<uint8_t>& got) {
    const int64_t start = now_ns();
    const int64_t deadline = start + timeout_us * 1000;
    std::vector<int> pending;
    for (int p = 0; p < num_ranks_; ++p)
      if (got[p] == 0 && load_mask(active, p) != 0) pending.push_back(p);
    std::vector<uint64_t> refused(num_ranks_, 0);
    // Published for waiting() on another thread (seq_cst throughout: the flags are set before the
    // start and cleared after it, so a reader that sees one start before and after its flag reads
    // read flags of that wait only).
    if (!pending.empty()) {
      for (int p : pending) wait_pending_[p].store(1);
      wait_phase_.store(phase);
      wait_layer_.store(layer);
      wait_start_ns_.store(start);
    }
    Doorbell* bell = doorbell(rank_);
    int polls = 0;
    bool sleeping = false;
    while (!pending.empty()) {
      const uint32_t ring = bell->ring.load(std::memory_order_seq_cst);
      for (size_t i = 0; i < pending.size();) {
        const int p = pending[i];
        const uint64_t s = mailbox(phase, p, rank_)->stamp.load(std::memory_order_acquire);
        bool done = false;
        if (s == want) {
          got[p] = 1;
          done = true;
        } else if (s != 0 && (s >> 32) != static_cast<uint64_t>(epoch_) && s != refused[p]) {
          refused[p] = s;
          ++refused_stale_epoch_;
        }
        if (!done && load_mask(active, p) == 0) done = true;  // zeroed under us: skip it
        if (done) {
          wait_pending_[p].store(0);
          pending[i] = pending.back();
          pending.pop_back();
        } else {
          ++i;
        }
      }
      if (pending.empty()) break;
      const int64_t now = now_ns();
      if (now >= deadline) {
        const int64_t waited_us = (now - start) / 1000;
        std::sort(pending.begin(), pending.end());
        for (int p : pending) {
          clear_mask(active, p);
          last_timeouts_.push_back({p, op, layer, waited_us});
          ++peer_timeouts_;
        }
        break;
      }
      if (polls < kPollsBeforeSleep || now - start < spin_ns_) {
        ++polls;
        for (int i = 0; i < kPausesPerPoll; ++i) cpu_relax();
        continue;
      }
      if (!sleeping) {
        // Announce before re-reading `ring`, so a sender that bumps it afterwards sees us.
        bell->sleepers.fetch_add(1, std::memory_order_seq_cst);
        sleeping = true;
        continue;
      }
      // Ask to be woken once as many messages have arrived as are still missing. A sender that
      // bumps the ring after our re-read below sees this target; one that bumped it before makes
      // the re-read differ and we scan again. Messages we do not need (a late peer's) only make
      // the wake-up early, never lost.
      bell->target.store(ring + static_cast<uint32_t>(pending.size()), std::memory_order_seq_cst);
      if (bell->ring.load(std::memory_order_seq_cst) != ring) continue;
      futex_wait(&bell->ring, ring, std::min(deadline - now, kMaxSleepNs));
    }
    if (sleeping) bell->sleepers.fetch_sub(1, std::memory_order_seq_cst);
    if (wait_start_ns_.load() != 0) {
      wait_start_ns_.store(0);
      for (int p = 0; p < num_ranks_; ++p) wait_pending_[p].store(0);
    }
  }

  const int rank_, num_ranks_, slots_per_rank_, max_tokens_, hidden_, topk_;
  const int64_t epoch_;
  const std::string shm_name_;

  uint8_t* base_ = nullptr;
  size_t total_bytes_ = 0, doorbell_off_ = 0, gen_off_ = 0, mailbox_off_ = 0, send_off_ = 0, dmeta_off_ = 0;
  size_t cmeta_off_ = 0, region_off_ = 0;
  size_t send_bytes_ = 0, dmeta_bytes_ = 0, cmeta_bytes_ = 0, region_bytes_ = 0, region_rows_ = 0;
  // This rank's return region as mapped a second time by the caller (EPBuffer), 0 if not: a
  // recv_x or expert_out there is the same memory as region(rank_).
  uintptr_t region_alias_ = 0;
  uint64_t segment_dev_ = 0, segment_ino_ = 0;  // which file this rank mapped (a name can be reused)

  State state_ = State::kClosed;
  int64_t spin_ns_ = 0;
  uint64_t seq_ = 0;
  int64_t tokens_ = 0;
  int64_t capacity_ = 0;
  uint32_t dtype_ = kFloat32;
  const uint8_t* x_ = nullptr;  // the dispatching x, between dispatch_send_wait and dispatch_unpack
  std::vector<int64_t> topk_copy_;
  std::vector<int32_t> comb_row_;      // [tokens * topk]: row in the owner's combine message, -1 none
  std::vector<uint8_t> sent_dispatch_;  // [num_ranks]: a dispatch message was posted to that rank
  std::vector<uint8_t> got_dispatch_;   // [num_ranks]: that rank's dispatch message was received
  std::vector<uint32_t> sent_rows_;     // [num_ranks]: rows of the dispatch message posted there
  std::vector<uint8_t> wanted_;         // [tokens]: another rank wants this token's row
  std::vector<std::vector<std::pair<int32_t, int32_t>>> recv_records_;  // per src: (slot, pos) in send order
  std::vector<int32_t> counts_;

  std::vector<PeerTimeoutRecord> last_timeouts_;
  // The wait in progress (wait_peers), for waiting(): its start (0 = none), phase, layer and the
  // peers it still waits on. Written only by the thread inside dispatch/combine.
  std::atomic<int64_t> wait_start_ns_{0};
  std::atomic<int> wait_phase_{0}, wait_layer_{-1};
  std::unique_ptr<std::atomic<uint8_t>[]> wait_pending_;
  uint64_t dispatch_calls_ = 0, combine_calls_ = 0, peer_timeouts_ = 0, refused_stale_epoch_ = 0;
  uint64_t overwritten_reads_ = 0;  // owners dropped because they rewrote their region under a read
};

void register_ep_kernel(py::module_& m) {
  py::class_<KernelRuntime>(m, "KernelRuntime",
                            "One rank's attachment to the shared dispatch/combine segment. Use "
                            "elasticep.kernel.EPBuffer rather than this class.")
      .def(py::init<int, int, int, int, int, int, int64_t, std::string, int64_t>(), py::arg("rank"),
           py::arg("num_ranks"), py::arg("slots_per_rank"), py::arg("max_tokens"), py::arg("hidden"), py::arg("topk"),
           py::arg("epoch"), py::arg("shm_name"), py::arg("spin_us") = -1)
      .def("dispatch_send_wait", &KernelRuntime::dispatch_send_wait, py::arg("x_ptr"), py::arg("tokens"),
           py::arg("dtype"), py::arg("topk_ptr"), py::arg("active_ptr"), py::arg("timeout_us"), py::arg("layer"),
           py::call_guard<py::gil_scoped_release>())
      .def("dispatch", &KernelRuntime::dispatch, py::arg("x_ptr"), py::arg("tokens"), py::arg("dtype"),
           py::arg("topk_ptr"), py::arg("active_ptr"), py::arg("timeout_us"), py::arg("layer"), py::arg("counts_ptr"),
           py::call_guard<py::gil_scoped_release>())
      .def("dispatch_unpack", &KernelRuntime::dispatch_unpack, py::arg("recv_ptr"), py::arg("capacity"),
           py::arg("slot_stride"),
           py::call_guard<py::gil_scoped_release>())
      .def("combine", &KernelRuntime::combine, py::arg("expert_out_ptr"), py::arg("capacity"),
           py::arg("slot_stride"), py::arg("weights_ptr"),
           py::arg("topk_ptr"), py::arg("tokens"), py::arg("out_ptr"), py::arg("active_ptr"), py::arg("timeout_us"),
           py::arg("layer"), py::call_guard<py::gil_scoped_release>())
      .def("last_timeouts", &KernelRuntime::last_timeouts)
      .def("waiting", &KernelRuntime::waiting, py::arg("min_us") = 0)
      .def_property_readonly("last_timeout_count", &KernelRuntime::last_timeout_count)
      .def_property_readonly("refused_stale_epoch", &KernelRuntime::refused_stale_epoch)
      .def("stats", &KernelRuntime::stats)
      .def("close", &KernelRuntime::close)
      .def_property_readonly("rank", &KernelRuntime::rank)
      .def_property_readonly("num_ranks", &KernelRuntime::num_ranks)
      .def_property_readonly("slots_per_rank", &KernelRuntime::slots_per_rank)
      .def_property_readonly("max_tokens", &KernelRuntime::max_tokens)
      .def_property_readonly("hidden", &KernelRuntime::hidden)
      .def_property_readonly("topk", &KernelRuntime::topk)
      .def_property_readonly("epoch", &KernelRuntime::epoch)
      .def_property_readonly("shm_name", &KernelRuntime::shm_name)
      .def_property_readonly("seq", &KernelRuntime::seq)
      .def_property_readonly("segment_bytes", &KernelRuntime::segment_bytes)
      .def_property_readonly("region_offset", &KernelRuntime::region_offset)
      .def_property_readonly("region_bytes", &KernelRuntime::region_bytes)
      .def_property_readonly("region_alias", &KernelRuntime::region_alias)
      .def_property_readonly("segment_file_id", &KernelRuntime::segment_file_id)
      .def("set_region_alias", &KernelRuntime::set_region_alias, py::arg("ptr"))
      .def_property_readonly("closed", &KernelRuntime::closed);

  m.def(
      "shm_unlink",
      [](const std::string& name) { return ::shm_unlink(name.c_str()) == 0; },
      py::arg("name"), "Removes a shared segment name; True if it existed.");
}

}  // namespace elasticep
