// A persistent kernel for the action expert's layer chain (Pi0, batch 1, <= 64 suffix rows):
// every Euler step's 18 layers run in ONE launch with one block per SM and grid barriers between
// the phases. Why: the Triton chain (one kernel per product) spends ~27 us per layer-step in
// per-kernel latency (docs/PERFORMANCE.md, round 6). Here each block streams its whole share of
// the weights as one "tape" through a ring of shared-memory slots with cp.async, so the next
// phase's weights are already in flight while the block waits at a grid barrier. Measured in
// round 7 (docs/PERFORMANCE.md): correct, but slower than the Triton chain; kept as an experiment.
//
// Phases per layer: norm -> QKV (+ rotary, K/V write) -> attention partials (head x key split)
// -> combine -> Wo (+ residual, fp32 atomics) -> norm -> gate/up (+ gelu_tanh(g) * u) -> down
// (+ residual). The residual stream x is float32 (64 rows, rows >= R unused).
//
// Weight slots: 16 output columns x 512 inputs (+ SLOT_PAD, against bank conflicts), packed on the
// host in each block's consumption order (kvreuse.model.megakernel.pack_layer). Work items:
//   QKV     80 items: head slot hs = i / 8 (8 q, k, v), dims [16u, 16u+16) and the rotary partners
//           [128 + 16u, ...), u = i % 8; K = 1024 in 2 slots each -> 4 slots.
//   Wo     128 items: 32 output columns (32 n-ranges) x 512 of K = 2048 (4 k-slices) -> 2 slots.
//   gate/up 128 items: gate columns [32i, 32i+32) and the same up columns, K = 1024 -> 8 slots.
//   down   128 items: 64 output columns (16 n-ranges) x 512 of K = 4096 (8 k-slices) -> 4 slots.
// Products: WMMA (mma.sync) by default; -DWGMMA puts them on sm_90a wgmma instead (activations
// and weight slots then packed as 8 x 8 core matrices, a slot holding all of an item's columns for
// 512 / G of its inputs; pack_layer(core=True)).
// Build: nvcc -O3 -gencode arch=compute_90a,code=sm_90a -shared -Xcompiler -fPIC (megakernel.build).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <math.h>

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

constexpr int ROWS = 64;          // padded suffix rows
constexpr int W = 1024;           // expert width
constexpr int H = 8;              // query heads (one K/V head)
constexpr int D = 256;            // head dim
constexpr int SLOT_K = 512;
#ifndef SLOT_PAD
#define SLOT_PAD 8
#endif
constexpr int SLOT_LD = SLOT_K + SLOT_PAD;  // padded against smem bank conflicts
constexpr int SLOT_ELEMS = 16 * SLOT_LD;
constexpr int SLOT_BYTES = SLOT_ELEMS * 2;  // 16640 (16384 unpadded, the WGMMA build)
constexpr int SLOT_CHUNKS = SLOT_BYTES / 16;
#ifndef NSTAGE
#define NSTAGE 8
#endif
constexpr int THREADS = 256;
constexpr int KEYS = 48;          // keys per attention split
constexpr int N_QKV = 80, N_ITEMS = 128;
constexpr int SLOTS_QKV = 4, SLOTS_REST = 2 + 8 + 4;
// Shared memory: the weight ring, then a region U that each phase uses its own way:
//   products: the item's 512-input slab of activations (tiled, below); once the products are done,
//             the same bytes are the scratch where the warps' partial sums meet (<= 64 KB);
//   attention: q (tiled), K and V chunks (K/V tiles; P [64][KEYS] over K once used), S [64][KEYS].
// Activations (xn, q per head, ao, act) live in global memory as [K/16][64 rows][16], so a slab
// is one contiguous block (one TMA copy) and every 16x16 fragment is 512 contiguous bytes (ldm 16);
// the WGMMA build keeps the products' activations (xn, ao, act) as [K/8][64 rows][8] instead.
// The K/V cache is [key/16][D/16][16 keys][16 dims] per layer, for the same reasons.
constexpr int A_BYTES = ROWS * SLOT_K * 2;
constexpr int SCRATCH_BYTES = 8 * 8 * 256 * 4;
constexpr int Q_BYTES = ROWS * D * 2, KV_BYTES = KEYS * D * 2;
constexpr int U_BYTES = Q_BYTES + 2 * KV_BYTES + ROWS * KEYS * 4;
static_assert(A_BYTES <= U_BYTES && SCRATCH_BYTES <= A_BYTES, "U holds every phase's data");
constexpr int SMEM_BYTES = NSTAGE * SLOT_BYTES + U_BYTES;
static_assert(SMEM_BYTES + 16 <= 232448, "over the 227 KB of shared memory a block may have");

struct Params {
  const bf16* tape;        // [layers][layer_slots][SLOT_ELEMS]
  const float* in_norm;    // [layers][W], (1 + w)
  const float* post_norm;  // [layers][W]
  const float* cosb;       // [R][D/2]
  const float* sinb;       // [R][D/2]
  const float* bias;       // [ROWS][nkp] additive mask
  float* x;                // [ROWS][W]
  bf16* xn;                // [W/16][ROWS][16]
  bf16* q;                 // [H][D/16][ROWS][16]
  bf16* kc;                // [layers][nkp/16][D/16][16][16]
  bf16* vc;                // [layers][nkp/16][D/16][16][16]
  float* opart;            // [H][nsplit][ROWS][D]
  float* ml;               // [H][nsplit][ROWS][2]
  bf16* ao;                // [H*D/16][ROWS][16]
  bf16* act;               // [F/16][ROWS][16]
  unsigned* bar;           // grid barrier counter (zeroed before the launch)
  unsigned long long* prof;  // optional [16]: block 0's clock64 cycles per phase (incl. its barrier),
                             // then inside the products: [8] weights wait, [9] staging wait,
                             // [10] tensor-core loop; in the attention: [11] staging wait,
                             // [12] q k^T, [13] softmax, [14] P v + partial stores
  int layers, steps, rows, T, nsplit, nkp, nblocks;
  int barriers_only;       // a timing bound: every phase skipped, only the grid barriers run
  float eps;
};

__device__ __forceinline__ void cp_async16(void* s, const void* g) {
  unsigned a = (unsigned)__cvta_generic_to_shared(s);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(a), "l"(g));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
__device__ void cp_wait_n(int n) {  // wait_group takes an immediate
  switch (n) {
    case 0: cp_wait<0>(); break; case 1: cp_wait<1>(); break; case 2: cp_wait<2>(); break;
    case 3: cp_wait<3>(); break; case 4: cp_wait<4>(); break; case 5: cp_wait<5>(); break;
    case 6: cp_wait<6>(); break; case 7: cp_wait<7>(); break; case 8: cp_wait<8>(); break;
    case 9: cp_wait<9>(); break; default: cp_wait<10>(); break;
  }
}

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Cooperative-groups style grid barrier on a monotonically increasing counter.
__device__ void grid_sync(unsigned* bar, unsigned& target, int nblocks) {
  __syncthreads();
  target += nblocks;
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(bar, 1u);
    while (ld_acquire(bar) < target) {
    }
    __threadfence();
  }
  __syncthreads();
}

// The block's weight tape: slot i of the whole launch is slot (i % n) of layer (i / n) % layers.
struct Tape {
  const bf16* base;  // this block's first slot in layer 0
  long long layer_stride, issued, consumed, total;
  int n, layers;
  bf16* ring;

  __device__ void issue_one() {
    if (issued < total) {
      long long ls = issued / n;
      int j = (int)(issued - ls * n);
      const char* src = (const char*)(base + ((ls % layers) * layer_stride + (long long)j * SLOT_ELEMS));
      char* dst = (char*)(ring + (issued % NSTAGE) * SLOT_ELEMS);
      for (int c = threadIdx.x; c < SLOT_CHUNKS; c += THREADS) cp_async16(dst + 16 * c, src + 16 * c);
    }
    cp_commit();  // one group per slot, empty past the end: the counting stays uniform
    issued++;
  }
  __device__ void fill() {
    while (issued < consumed + NSTAGE) issue_one();
  }
  __device__ void acquire(int g) {  // slots [consumed, consumed + g) landed, for every thread
    cp_wait_n((int)(issued - (consumed + g)));
#ifdef WGMMA  // cp.async wrote through the generic proxy; wgmma reads through the async one
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
    __syncthreads();
  }
  __device__ void release(int g) {
    consumed += g;
    __syncthreads();  // nobody reads the released slots any more
    fill();
  }
  __device__ const bf16* slot(int g) const { return ring + ((consumed + g) % NSTAGE) * SLOT_ELEMS; }
};

__device__ __forceinline__ int tiled(int r, int c) { return ((c >> 4) * ROWS + r) * 16 + (c & 15); }
#ifdef WGMMA  // the products' activations in wgmma's core matrices: [K/8][64 rows][8]
__device__ __forceinline__ int atile(int r, int c) { return ((c >> 3) * ROWS + r) * 8 + (c & 7); }
#else
__device__ __forceinline__ int atile(int r, int c) { return tiled(r, c); }
#endif
__device__ __forceinline__ int kv_tiled(int key, int d) {
  return (((key >> 4) * (D / 16) + (d >> 4)) * 16 + (key & 15)) * 16 + (d & 15);
}

__device__ __forceinline__ float gelu_tanh(float g) {
  return 0.5f * g * (1.f + tanhf(0.7978845608028654f * (g + 0.044715f * g * g * g)));
}

// Activations produced by other blocks in the previous phase are staged in shared memory by TMA
// bulk copies that complete on an mbarrier: no registers, no L1 (whose lines could be stale), and
// apart from the weight ring's cp.async groups. One copy per contiguous block, not per row: each
// copy has a cost of its own (~20 ns, round 7).
__device__ __forceinline__ unsigned smem_u32(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(bar)));
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::);
}
struct Stage {
  unsigned long long* bar;
  unsigned phase;
  // Warp 0 only: begin(total bytes), then rows(...) copies n blocks of `bytes` each (dst_ld /
  // src_ld bytes apart); everything before one wait() goes to one expect_tx.
  __device__ void begin(unsigned total) {
#ifndef NO_GFENCE  // a variant: trust the grid barrier's fences alone for the TMA reads of global data
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
#endif
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    if (threadIdx.x == 0)
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(total) : "memory");
    __syncwarp();
  }
  __device__ void rows(void* dst, int dst_ld, const void* src, int src_ld, int n, int bytes) {
    for (int r = threadIdx.x; r < n; r += 32)
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                   ::"r"(smem_u32((char*)dst + r * dst_ld)), "l"((const char*)src + (long long)r * src_ld), "r"(bytes),
                   "r"(smem_u32(bar)) : "memory");
  }
  __device__ void wait() {  // every thread
    unsigned ok = 0;
    while (!ok)
      asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                   : "=r"(ok) : "r"(smem_u32(bar)), "r"(phase) : "memory");
    phase ^= 1;
  }
};

#ifdef WGMMA
// wgmma (sm_90a): both operands read from shared memory by the tensor cores. K-major, no swizzle:
// 8 x 8 core matrices of 128 contiguous bytes; LBO = the byte step between core matrices along K,
// SBO = along M / N (the other reading gives NaNs: measured in round 7).
__device__ __forceinline__ unsigned long long gdesc(const void* smem, unsigned lbo, unsigned sbo) {
  unsigned long long a = smem_u32(smem);
  return ((a & 0x3FFFF) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
         ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32);
}
__device__ __forceinline__ void wgmma_n(float (&d)[16], unsigned long long da, unsigned long long db) {  // N = 32
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db));
}
__device__ __forceinline__ void wgmma_n(float (&d)[32], unsigned long long da, unsigned long long db) {  // N = 64
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, "
      "%13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, "
      "1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
        "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
        "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db));
}
#endif

// One item's product: out[64, 16G] = A[64, k0 : k0 + 512 KS] @ slots^T. Per 512 inputs the block
// stages A's rows in shared memory (TMA, issued before waiting for the weights); each warp takes
// all 64 rows x 32 columns (two slots) over a part of the inputs, and the parts meet in scratch
// (8 warps x 8 tiles = 64 KB, over the staging area). Rows >= R of the staging area hold stale
// data: they only reach output rows that are never written.
template <int G, int KS>
__device__ void item_product(const Params& p, Tape& tp, Stage& st, unsigned char* U, const bf16* A, int k0) {
  bf16* As = reinterpret_cast<bf16*>(U);
  float* scratch = reinterpret_cast<float*>(U);  // after the last release's barrier
  const int warp = threadIdx.x >> 5;
#ifdef WGMMA
  // In this build a slot holds all 16 G columns of the item for 512 / G inputs, so one wgmma of
  // N = 16 G covers the item; warpgroup wg takes slots [wg G/2, (wg + 1) G/2) of each slab.
  const int wg = warp >> 2;
  constexpr int N = 16 * G, SK = SLOT_K / G;  // columns; inputs per slot
  float d[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; i++) d[i] = 0.f;
#else
  // Warp w: column pair cg (groups 2cg, 2cg+1) x input part kp of KP; all 64 rows.
  constexpr int NCG = G / 2, KP = 8 / NCG, NACC = 8;
  const int cg = warp % NCG, kp = warp / NCG;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[NACC];
#pragma unroll
  for (int g = 0; g < NACC; g++) wmma::fill_fragment(acc[g], 0.f);
#endif
  for (int ks = 0; ks < KS; ks++) {
#ifndef NO_STAGE  // a bound: products over whatever the staging area holds (wrong numbers)
    if (threadIdx.x < 32) {  // the staging area is free: a barrier separates it from its last reader
      st.begin(A_BYTES);
      st.rows(As, 0, A + (k0 + ks * SLOT_K) / 16 * (ROWS * 16), 0, 1, A_BYTES);
    }
#endif
    long long c0 = clock64();
    tp.acquire(G);
    long long c1 = clock64();
#ifndef NO_STAGE
    st.wait();
#endif
    long long c2 = clock64();
#ifdef WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int si = 0; si < G / 2; si++) {
      const int sl = wg * (G / 2) + si;
      const bf16* b = tp.slot(sl);
#pragma unroll 4
      for (int j = 0; j < SK / 16; j++) {
        const int kk = sl * (SK / 16) + j;  // k16 step within the slab: two k8 core-matrix columns
        wgmma_n(d, gdesc(As + kk * 2 * (ROWS * 8), ROWS * 16, 128), gdesc(b + j * 2 * (N * 8), N * 16, 128));
      }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#else
    const int k_lo = kp * (SLOT_K / KP);
    const bf16* b0 = tp.slot(2 * cg) + k_lo;
    const bf16* b1 = tp.slot(2 * cg + 1) + k_lo;
    const bf16* a0 = As + k_lo / 16 * (ROWS * 16);
#ifdef FULL_UNROLL  // a variant: every fragment load of the part hoistable
#pragma unroll
#else
#pragma unroll 2
#endif
    for (int j = 0; j < SLOT_K / KP / 16; j++) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> f0, f1;
      wmma::load_matrix_sync(f0, b0 + 16 * j, SLOT_LD);
      wmma::load_matrix_sync(f1, b1 + 16 * j, SLOT_LD);
#pragma unroll
      for (int m = 0; m < 4; m++) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> af;
        wmma::load_matrix_sync(af, a0 + j * (ROWS * 16) + m * 256, 16);
        wmma::mma_sync(acc[2 * m], af, f0, acc[2 * m]);
        wmma::mma_sync(acc[2 * m + 1], af, f1, acc[2 * m + 1]);
      }
    }
#endif
    tp.release(G);
    if (p.prof && blockIdx.x == 0 && threadIdx.x == 0) {
      long long c3 = clock64();
      atomicAdd(p.prof + 8, (unsigned long long)(c1 - c0));
      atomicAdd(p.prof + 9, (unsigned long long)(c2 - c1));
      atomicAdd(p.prof + 10, (unsigned long long)(c3 - c2));
    }
  }
#ifdef WGMMA
  {  // accumulator fragment: rows 16 (warp % 4) + lane / 4 (+ 8), columns 8 i + 2 (lane % 4) (+ 1)
    const int lane = threadIdx.x & 31, row = 16 * (warp & 3) + (lane >> 2), col = 2 * (lane & 3);
    float* o = scratch + wg * (ROWS * N);
#pragma unroll
    for (int i = 0; i < N / 8; i++) {
      o[row * N + 8 * i + col] = d[4 * i];
      o[row * N + 8 * i + col + 1] = d[4 * i + 1];
      o[(row + 8) * N + 8 * i + col] = d[4 * i + 2];
      o[(row + 8) * N + 8 * i + col + 1] = d[4 * i + 3];
    }
  }
#else
#pragma unroll
  for (int g = 0; g < NACC; g++) wmma::store_matrix_sync(scratch + (warp * NACC + g) * 256, acc[g], 16, wmma::mem_row_major);
#endif
  __syncthreads();
}

// The finished product at (row r, column c of the item): the warps' input parts summed.
template <int G>
__device__ __forceinline__ float item_out(const float* scratch, int r, int c) {
#ifdef WGMMA
  return scratch[r * 16 * G + c] + scratch[ROWS * 16 * G + r * 16 * G + c];
#else
  int mt = r >> 4, rr = r & 15, g = c >> 4, cc = c & 15;
  constexpr int NCG = G / 2, KP = 8 / NCG;
  const int cg = g >> 1, tile = 2 * mt + (g & 1);
  float v = 0.f;
#pragma unroll
  for (int kp = 0; kp < KP; kp++) v += scratch[((kp * NCG + cg) * 8 + tile) * 256 + rr * 16 + cc];
  return v;
#endif
}

__device__ void norm_phase(const Params& p, const float* w, float* red) {
  int r = blockIdx.x;
  if (r >= p.rows) return;
  float4 v = reinterpret_cast<const float4*>(p.x + r * W)[threadIdx.x];
  float ss = v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  float tot = 0.f;
#pragma unroll
  for (int i = 0; i < THREADS / 32; i++) tot += red[i];
  float rs = rsqrtf(tot / W + p.eps);
  float4 g = reinterpret_cast<const float4*>(w)[threadIdx.x];
  bf16* out = p.xn + atile(r, threadIdx.x * 4);
  out[0] = __float2bfloat16(v.x * rs * g.x);
  out[1] = __float2bfloat16(v.y * rs * g.y);
  out[2] = __float2bfloat16(v.z * rs * g.z);
  out[3] = __float2bfloat16(v.w * rs * g.w);
  __syncthreads();  // red is reused by the next norm
}

__device__ void qkv_phase(const Params& p, Tape& tp, Stage& st, unsigned char* U, int layer) {
  int i = blockIdx.x;
  item_product<2, 2>(p, tp, st, U, p.xn, 0);
  const float* scratch = reinterpret_cast<const float*>(U);
  int hs = i / 8, u = i % 8;
  bf16* kc = p.kc + (long long)layer * p.nkp * D;
  bf16* vc = p.vc + (long long)layer * p.nkp * D;
  bf16* q = p.q + hs * D * ROWS;
  for (int e = threadIdx.x; e < ROWS * 16; e += THREADS) {
    int r = e >> 4, cc = e & 15;
    if (r >= p.rows) continue;
    float a = item_out<2>(scratch, r, cc), b = item_out<2>(scratch, r, 16 + cc);
    int d = 16 * u + cc;
    if (hs < H + 1) {  // rotate-half rotary on q and k
      float c = p.cosb[r * (D / 2) + d], s = p.sinb[r * (D / 2) + d];
      float o1 = a * c - b * s, o2 = b * c + a * s;
      a = o1;
      b = o2;
    }
    if (hs < H) {
      q[tiled(r, d)] = __float2bfloat16(a);
      q[tiled(r, d + D / 2)] = __float2bfloat16(b);
    } else {
      bf16* c = hs == H ? kc : vc;
      c[kv_tiled(p.T + r, d)] = __float2bfloat16(a);
      c[kv_tiled(p.T + r, d + D / 2)] = __float2bfloat16(b);
    }
  }
  __syncthreads();
}

// Attention partials of (head h, key split sp): q, K and V staged in shared memory first.
__device__ void attn_phase(const Params& p, Stage& st, unsigned char* U, int layer) {
  int h = blockIdx.x / p.nsplit, sp = blockIdx.x % p.nsplit;
  const int warp = threadIdx.x >> 5;
  bf16* qs = reinterpret_cast<bf16*>(U);
  bf16* ks = reinterpret_cast<bf16*>(U + Q_BYTES);
  bf16* vs = reinterpret_cast<bf16*>(U + Q_BYTES + KV_BYTES);
  float* S = reinterpret_cast<float*>(U + Q_BYTES + 2 * KV_BYTES);  // [64][KEYS]
  bf16* P = ks;                                                      // [64][KEYS], once K is used
  const bf16* kc = p.kc + ((long long)layer * p.nkp + sp * KEYS) * D;  // KEYS / 16 whole key tiles
  const bf16* vc = p.vc + ((long long)layer * p.nkp + sp * KEYS) * D;
  if (threadIdx.x < 32) {
    st.begin(Q_BYTES + 2 * KV_BYTES);
    st.rows(qs, 0, p.q + h * D * ROWS, 0, 1, Q_BYTES);
    st.rows(ks, 0, kc, 0, 1, KV_BYTES);
    st.rows(vs, 0, vc, 0, 1, KV_BYTES);
  }
  const bool prof = p.prof && blockIdx.x == 0 && threadIdx.x == 0;
  long long c0 = clock64();
  st.wait();
  long long c1 = clock64();
  for (int t = warp; t < 4 * (KEYS / 16); t += 8) {
    int mt = t / (KEYS / 16), nt = t % (KEYS / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll 4
    for (int j = 0; j < D / 16; j++) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> af;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> bfr;
      wmma::load_matrix_sync(af, qs + j * (ROWS * 16) + mt * 256, 16);
      wmma::load_matrix_sync(bfr, ks + (nt * (D / 16) + j) * 256, 16);
      wmma::mma_sync(acc, af, bfr, acc);
    }
    wmma::store_matrix_sync(S + mt * 16 * KEYS + nt * 16, acc, KEYS, wmma::mem_row_major);
  }
  __syncthreads();
  long long c2 = clock64();
  {  // softmax pieces: 4 threads per row, 12 keys each; P overwrites K
    int r = threadIdx.x >> 2, sub = threadIdx.x & 3;
    const float scale = rsqrtf((float)D);
    float sc[KEYS / 4];
    float m = -INFINITY;
#pragma unroll
    for (int k = 0; k < KEYS / 4; k++) {
      int key = sub * (KEYS / 4) + k;
      sc[k] = S[r * KEYS + key] * scale + p.bias[r * p.nkp + sp * KEYS + key];
      m = fmaxf(m, sc[k]);
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 1));
    m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, 2));
    float mu = m == -INFINITY ? 0.f : m, l = 0.f;
#pragma unroll
    for (int k = 0; k < KEYS / 4; k++) {
      float e = __expf(sc[k] - mu);
      l += e;
      P[r * KEYS + sub * (KEYS / 4) + k] = __float2bfloat16(e);
    }
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    if (sub == 0) {
      float* o = p.ml + (((long long)h * p.nsplit + sp) * ROWS + r) * 2;
      o[0] = m;
      o[1] = l;
    }
  }
  __syncthreads();
  long long c3 = clock64();
  float* op = p.opart + ((long long)h * p.nsplit + sp) * ROWS * D;
  for (int t = warp; t < 4 * (D / 16); t += 8) {
    int mt = t / (D / 16), nt = t % (D / 16);
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.f);
#pragma unroll
    for (int j = 0; j < KEYS / 16; j++) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> af;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> bfr;
      wmma::load_matrix_sync(af, P + mt * 16 * KEYS + 16 * j, KEYS);
      wmma::load_matrix_sync(bfr, vs + (j * (D / 16) + nt) * 256, 16);
      wmma::mma_sync(acc, af, bfr, acc);
    }
    wmma::store_matrix_sync(op + (mt * 16) * D + nt * 16, acc, D, wmma::mem_row_major);
  }
  __syncthreads();
  if (prof) {
    long long c4 = clock64();
    p.prof[11] += (unsigned long long)(c1 - c0);
    p.prof[12] += (unsigned long long)(c2 - c1);
    p.prof[13] += (unsigned long long)(c3 - c2);
    p.prof[14] += (unsigned long long)(c4 - c3);
  }
}

__device__ void combine_phase(const Params& p) {
  int gw = blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  for (int pair = gw; pair < p.rows * H; pair += p.nblocks * (THREADS / 32)) {
    int r = pair / H, h = pair % H;
    // Lane s holds split s's (max, sum); splits <= 32.
    float ms = -INFINITY, ls = 0.f;
    if (lane < p.nsplit) {
      const float* ml = p.ml + (((long long)h * p.nsplit + lane) * ROWS + r) * 2;
      ms = ml[0];
      ls = ml[1];
    }
    float M = ms;
    for (int o = 16; o; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffff, M, o));
    float ws = ms == -INFINITY ? 0.f : __expf(ms - M), L = ws * ls;
    for (int o = 16; o; o >>= 1) L += __shfl_xor_sync(0xffffffff, L, o);
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll 4
    for (int s = 0; s < p.nsplit; s++) {
      float w = __shfl_sync(0xffffffff, ws, s);
      const float4* o = reinterpret_cast<const float4*>(p.opart + (((long long)h * p.nsplit + s) * ROWS + r) * D + lane * 8);
      float4 a = o[0], b = o[1];
      acc[0] += w * a.x; acc[1] += w * a.y; acc[2] += w * a.z; acc[3] += w * a.w;
      acc[4] += w * b.x; acc[5] += w * b.y; acc[6] += w * b.z; acc[7] += w * b.w;
    }
    float inv = 1.f / L;
    bf16* dst = p.ao + atile(r, h * D + lane * 8);
#pragma unroll
    for (int k = 0; k < 8; k++) dst[k] = __float2bfloat16(acc[k] * inv);
  }
}

template <int G, int KS>
__device__ void residual_phase(const Params& p, Tape& tp, Stage& st, unsigned char* U, const bf16* A, int n0, int k0) {
  item_product<G, KS>(p, tp, st, U, A, k0);
  const float* scratch = reinterpret_cast<const float*>(U);
  for (int e = threadIdx.x; e < ROWS * 16 * G; e += THREADS) {
    int r = e / (16 * G), c = e % (16 * G);
    if (r < p.rows) atomicAdd(p.x + r * W + n0 + c, item_out<G>(scratch, r, c));
  }
  __syncthreads();
}

__device__ void gate_up_phase(const Params& p, Tape& tp, Stage& st, unsigned char* U) {
  int i = blockIdx.x;
  item_product<4, 2>(p, tp, st, U, p.xn, 0);
  const float* scratch = reinterpret_cast<const float*>(U);
  for (int e = threadIdx.x; e < ROWS * 32; e += THREADS) {
    int r = e >> 5, c = e & 31;
    if (r >= p.rows) continue;
    float g = item_out<4>(scratch, r, c), u = item_out<4>(scratch, r, 32 + c);
    p.act[atile(r, 32 * i + c)] = __float2bfloat16(gelu_tanh(g) * u);
  }
  __syncthreads();
}

__global__ void __launch_bounds__(THREADS, 1) expert_chain_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ring = reinterpret_cast<bf16*>(smem);
  unsigned char* U = smem + NSTAGE * SLOT_BYTES;
  float* red = reinterpret_cast<float*>(U);
  __shared__ unsigned long long stage_bar;
  if (threadIdx.x == 0) mbar_init(&stage_bar);
  __syncthreads();
  Stage st{&stage_bar, 0};
  const int b = blockIdx.x;
  const int n = (b < N_QKV ? SLOTS_QKV : 0) + (b < N_ITEMS ? SLOTS_REST : 0);
  const long long start = (long long)min(b, N_QKV) * SLOTS_QKV + (long long)min(b, N_ITEMS) * SLOTS_REST;
#ifdef SAME_LAYER  // a bound: every layer streams layer 0's weights, which stay in L2
  const long long stride = 0;
#else
  const long long stride = ((long long)N_QKV * SLOTS_QKV + (long long)N_ITEMS * SLOTS_REST) * SLOT_ELEMS;
#endif
  Tape tp{p.tape + start * SLOT_ELEMS, stride, 0, 0,
          n && !p.barriers_only ? (long long)p.steps * p.layers * n : 0, n ? n : 1, p.layers, ring};
  tp.fill();
  unsigned target = 0;
  const bool item = b < N_ITEMS, run = !p.barriers_only;
  const bool prof = p.prof && b == 0 && threadIdx.x == 0;
  long long t0 = clock64();
  auto sync = [&](int phase) {
    grid_sync(p.bar, target, p.nblocks);
    if (prof) {
      long long t1 = clock64();
      p.prof[phase] += (unsigned long long)(t1 - t0);
      t0 = t1;
    }
  };
  for (int step = 0; step < p.steps; step++) {
    for (int l = 0; l < p.layers; l++) {
      if (run) norm_phase(p, p.in_norm + l * W, red);
      sync(0);
      if (run && b < N_QKV) qkv_phase(p, tp, st, U, l);
      sync(1);
      if (run && b < H * p.nsplit) attn_phase(p, st, U, l);
      sync(2);
      if (run) combine_phase(p);
      sync(3);
      if (run && item) residual_phase<2, 1>(p, tp, st, U, p.ao, 32 * (b % 32), SLOT_K * (b / 32));
      sync(4);
      if (run) norm_phase(p, p.post_norm + l * W, red);
      sync(5);
      if (run && item) gate_up_phase(p, tp, st, U);
      sync(6);
      if (run && item) residual_phase<4, 1>(p, tp, st, U, p.act, 64 * (b % 16), SLOT_K * (b / 16));
      sync(7);
    }
  }
  cp_wait<0>();
}

// Returns a cudaError_t; the launch is cooperative, so all blocks are resident or it fails.
extern "C" int expert_chain_launch(const Params* p, void* stream) {
  static bool attr = false;
  if (!attr) {
    cudaError_t e = cudaFuncSetAttribute(expert_chain_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
    if (e != cudaSuccess) return (int)e;
    attr = true;
  }
  if (p->nblocks < N_ITEMS || p->nblocks < H * p->nsplit) return (int)cudaErrorInvalidValue;
  Params local = *p;
  void* args[] = {&local};
  return (int)cudaLaunchCooperativeKernel((void*)expert_chain_kernel, dim3(p->nblocks), dim3(THREADS), args,
                                          SMEM_BYTES, (cudaStream_t)stream);
}
