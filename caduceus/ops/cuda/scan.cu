// Mamba-1 selective scan forward for bf16 (b, l, d) rows, compiled at run time with NVRTC (caduceus/ops/cuda/scan.py).
//
// One warp per block of CH = 16 channels of one batch row (and, when time is cut into segments, one segment); lane
// 2c + r holds NV = 8 of channel c's 16 states in registers and walks time. The two lanes of a channel share its
// per-step work (softplus, output, gate) two steps at a time, each doing one step and passing values by shuffles.
// Rows are copied T = 16 steps at a time into shared memory with cp.async, S - 1 blocks ahead of use; B and C are
// widened to fp32 once per block. Reverse walks change only index arithmetic. The forward saves the state before
// every CHUNK-th walk step for the Triton backward, in the layout of the Triton forward's. The tiles (NV, T, S) are
// the best of five measured on an H100 (BENCHMARKS.md).
//
// With CADUCEUS_SCAN_HOST defined the device helpers and the kernel entry points are left out: tests/ops/test_cuda.py
// compiles scan_fwd on the CPU with host versions of them.

#define FULL 0xffffffffu
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
// CHUNK, the walk steps between saved states (the Triton backward's chunk), GRAD_CHECKPOINT and GRAD_SUMS (see
// scan_bwd) are defined by scan.py's compile options.
typedef unsigned short bf16_t;

#ifndef CADUCEUS_SCAN_HOST
__device__ __forceinline__ float ex2(float x) { float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ float lg2(float x) { float y; asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ float rcp(float x) { float y; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y; }
__device__ __forceinline__ bf16_t to_bf(float x) { bf16_t r; asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x)); return r; }
__device__ __forceinline__ void cp16(void* dst, const void* src, int bytes) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int P> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(P) : "memory"); }
#endif

__device__ __forceinline__ float bf(bf16_t x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : LN2 * lg2(1.f + ex2(x * LOG2E)); }
__device__ __forceinline__ float sigmoid(float x) { return rcp(1.f + ex2(-x * LOG2E)); }
__device__ __forceinline__ void unpack(uint4 w, float (&f)[8]) {  // 8 bf16 -> 8 fp32 in registers
    const unsigned v[4] = {w.x, w.y, w.z, w.w};
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(v[i] << 16);
        f[2 * i + 1] = __uint_as_float(v[i] & 0xffff0000u);
    }
}
__device__ __forceinline__ void widen(uint4 w, float* dst) {  // 8 bf16 -> 8 fp32 in shared memory
    float f[8];
    unpack(w, f);
    *(float4*)dst = make_float4(f[0], f[1], f[2], f[3]);
    *(float4*)(dst + 4) = make_float4(f[4], f[5], f[6], f[7]);
}

// The G lanes of a channel each hold partial outputs of the group's G steps; afterwards lane r holds step r's sum.
template <int G>
__device__ __forceinline__ float reduce_scatter(float (&p)[G], int r) {
    #pragma unroll
    for (int w = G / 2; w >= 1; w /= 2) {
        const bool hi = r & w;
        #pragma unroll
        for (int i = 0; i < w; ++i) {
            const float keep = hi ? p[w + i] : p[i], send = hi ? p[i] : p[w + i];
            p[i] = keep + __shfl_xor_sync(FULL, send, w);
        }
    }
    return p[0];
}

// Time may be cut into segments of seg_blocks blocks in walk order (blockIdx.z): a first launch with STATE_ONLY
// writes each segment's end state from a zero start and its sum of dt (seg_state (b, S, d, n), seg_dt (b, S, d)); the
// chaining kernel turns them into each segment's incoming state (init), with which a second launch writes the output.
template <int NV, int T, int S, bool REV, bool STATE_ONLY>
__device__ __forceinline__ void scan_fwd(
    const bf16_t* __restrict__ u, const bf16_t* __restrict__ dt, const float* __restrict__ A,
    const bf16_t* __restrict__ Bm, const bf16_t* __restrict__ Cm, const float* __restrict__ Dv,
    const bf16_t* __restrict__ z, const float* __restrict__ bias, bf16_t* __restrict__ out,
    int L, int D, long long s_Bb, long long s_Bl, long long s_Cb, long long s_Cl,
    int seg_blocks, float* __restrict__ seg_state, float* __restrict__ seg_dt, const float* __restrict__ init,
    float* __restrict__ states) {
    constexpr int N = 16, G = N / NV, CH = 32 / G;
    constexpr int VU = T * CH / 8, VB = T * N / 8;  // 16-byte vectors per block: u/dt/z rows, B/C rows
    constexpr int IU = (VU + 31) / 32, IB = (VB + 31) / 32;  // copies per lane and block
    constexpr int SU = T * CH, SB = T * N;  // elements per stage
    __shared__ __align__(16) bf16_t s_u[S * SU], s_dt[S * SU], s_z[S * SU], s_B[S * SB], s_C[S * SB];
    __shared__ __align__(16) float s_Bf[SB], s_Cf[SB];
    const int lane = threadIdx.x, c = lane / G, r = lane % G, n0 = r * NV;
    const int b = blockIdx.y, d0 = blockIdx.x * CH, d = d0 + c;
    // Blocks of T steps are aligned in walk order: walk block k holds time steps [k T, k T + T) forward, or
    // [L - k T - T, L - k T) in reverse; only the last one runs past the sequence (zero rows, outputs not stored).
    const int all_blocks = (L + T - 1) / T, seg = blockIdx.z, k0 = seg * seg_blocks;
    auto block_start = [&](int k) { return REV ? L - (k + 1) * T : k * T; };  // the time of the block's row 0
    const int nblk = min(all_blocks - k0, seg_blocks);  // this segment's blocks: walk blocks k0 .. k0 + nblk - 1
    const size_t row0 = (size_t)b * L * D;
    const size_t state_row = ((size_t)b * gridDim.z + seg) * D + d;
    float A2[NV], h[NV], dt_sum = 0.f;
    #pragma unroll
    for (int k = 0; k < NV; ++k) {
        A2[k] = A[d * N + n0 + k] * LOG2E;
        h[k] = init != nullptr ? init[state_row * N + n0 + k] : 0.f;
    }
    const float Dd = Dv[d], bias_d = bias[d];

    // What this lane copies: vector v = it * 32 + lane of a block is step v / (width / 8), channels (v % ...) * 8.
    auto issue = [&](int k) {
        if (k < nblk) {
            const int stage = k % S, base = block_start(k0 + k);
            #pragma unroll
            for (int it = 0; it < IU; ++it) {
                const int v = it * 32 + lane, i = v / (CH / 8), q = v % (CH / 8), t = base + i;
                if (VU % 32 == 0 || v < VU) {
                    const bool ok = (unsigned)t < (unsigned)L;
                    const int bytes = ok ? 16 : 0;
                    const size_t off = row0 + (size_t)(ok ? t : 0) * D + d0 + q * 8;
                    const int dst = stage * SU + i * CH + q * 8;
                    cp16(s_u + dst, u + off, bytes);
                    cp16(s_dt + dst, dt + off, bytes);
                    if (!STATE_ONLY) cp16(s_z + dst, z + off, bytes);
                }
            }
            #pragma unroll
            for (int it = 0; it < IB; ++it) {
                const int v = it * 32 + lane, i = v / 2, q = v % 2, t = base + i;
                if (VB % 32 == 0 || v < VB) {
                    const bool ok = (unsigned)t < (unsigned)L;
                    const int bytes = ok ? 16 : 0;
                    const long long tt = ok ? t : 0;
                    const int dst = stage * SB + i * N + q * 8;
                    cp16(s_B + dst, Bm + b * s_Bb + tt * s_Bl + q * 8, bytes);
                    cp16(s_C + dst, Cm + b * s_Cb + tt * s_Cl + q * 8, bytes);
                }
            }
        }
        cp_commit();
    };
    #pragma unroll
    for (int k = 0; k < S - 1; ++k) issue(k);
    const int dir = REV ? -1 : 1, first = REV ? T - 1 - r : r;  // this lane's own step in each group: first + dir * g * G
    for (int k = 0; k < nblk; ++k) {
        cp_wait<S - 2>();
        __syncwarp();
        const int stage = k % S, base = block_start(k0 + k), walk = (k0 + k) * T;
        if (states != nullptr && walk % CHUNK == 0) {  // for the backward: the state before every CHUNK-th walk step
            float* row = states + (((size_t)b * ((L + CHUNK - 1) / CHUNK) + walk / CHUNK) * D + d) * N + n0;
            #pragma unroll
            for (int q = 0; q < NV; q += 4) *(float4*)(row + q) = make_float4(h[q], h[q + 1], h[q + 2], h[q + 3]);
        }
        #pragma unroll
        for (int it = 0; it < IB; ++it) {
            const int v = it * 32 + lane;
            if (VB % 32 == 0 || v < VB) {
                widen(*(const uint4*)(s_B + stage * SB + v * 8), s_Bf + v * 8);
                widen(*(const uint4*)(s_C + stage * SB + v * 8), s_Cf + v * 8);
            }
        }
        __syncwarp();
        issue(k + S - 1);
        const bf16_t *pu = s_u + stage * SU + first * CH + c, *pdt = s_dt + stage * SU + first * CH + c;
        const bf16_t* pz = s_z + stage * SU + first * CH + c;
        const int own = base + first;  // this lane's step in the group g is own + dir * g * G
        bf16_t* po = out + row0 + (ptrdiff_t)own * D + d;
        #pragma unroll
        for (int g = 0; g < T / G; ++g) {
            const int off = dir * g * G;
            const float dtv = softplus(bf(pdt[off * CH]) + bias_d);
            const float uo = bf(pu[off * CH]);
            const float dtu = dtv * uo;
            float part[G];
            #pragma unroll
            for (int m = 0; m < G; ++m) {
                const int j = REV ? T - 1 - (g * G + m) : g * G + m;
                float dm = dtv, um = dtu;
                if (G > 1) {
                    dm = __shfl_sync(FULL, dtv, (lane & ~(G - 1)) | m);
                    um = __shfl_sync(FULL, dtu, (lane & ~(G - 1)) | m);
                }
                const float* pB = s_Bf + j * N + n0;
                const float* pC = s_Cf + j * N + n0;
                float ya = 0.f, yb = 0.f;
                #pragma unroll
                for (int k = 0; k < NV; k += 4) {
                    const float4 Bv = *(const float4*)(pB + k);
                    h[k] = fmaf(h[k], ex2(dm * A2[k]), um * Bv.x);
                    h[k + 1] = fmaf(h[k + 1], ex2(dm * A2[k + 1]), um * Bv.y);
                    h[k + 2] = fmaf(h[k + 2], ex2(dm * A2[k + 2]), um * Bv.z);
                    h[k + 3] = fmaf(h[k + 3], ex2(dm * A2[k + 3]), um * Bv.w);
                    if (!STATE_ONLY) {
                        const float4 Cv = *(const float4*)(pC + k);
                        ya = fmaf(h[k], Cv.x, ya); yb = fmaf(h[k + 1], Cv.y, yb);
                        ya = fmaf(h[k + 2], Cv.z, ya); yb = fmaf(h[k + 3], Cv.w, yb);
                    }
                }
                part[m] = ya + yb;
                if (STATE_ONLY) dt_sum += dm;
            }
            if (STATE_ONLY) continue;
            const float y = G > 1 ? reduce_scatter<G>(part, r) : part[0];
            const float zo = bf(pz[off * CH]);
            const float o = (y + Dd * uo) * zo * sigmoid(zo);
            if ((unsigned)(own + off) < (unsigned)L) po[(ptrdiff_t)off * D] = to_bf(o);  // not past the walk's end
        }
    }
    cp_wait<0>();
    if (STATE_ONLY) {  // steps past the walk's end add to dt_sum only in the last segment, whose decay is never used
        #pragma unroll
        for (int k = 0; k < NV; ++k) seg_state[state_row * N + n0 + k] = h[k];
        if (r == 0) seg_dt[state_row] = dt_sum;
    }
}

__device__ __forceinline__ float pair_sum(float x) { return x + __shfl_xor_sync(FULL, x, 1); }  // over a channel's lanes

// dB (p[0 .. 7]) and dC (p[8 .. 15]) of lane (c, r)'s channel and states summed over the warp's 16 channels, through
// shared memory, in two halves so that several steps' sums can share one pair of barriers: put_sums writes lane
// (c, r)'s 16 values into row c of `sums` (16 rows of 36 words; the pad keeps both the vector writes and the column
// reads free of bank conflicts) at words 16 r .. 16 r + 15; after a __syncwarp, column_sum has lane (c', r') add up
// column 16 r' + c' in a fixed order: the sum for state 8 r' + c' % 8 of dB (c' < 8) or dC (4 + 16 shared memory
// accesses and 15 adds against a reduce-scatter's 15 shuffles, 15 adds and 30 selects).
constexpr int SUMS_WORDS = 16 * 36;
__device__ __forceinline__ void put_sums(const float (&p)[16], float* sums, int lane) {
    float* row = sums + lane / 2 * 36 + lane % 2 * 16;
    #pragma unroll
    for (int q = 0; q < 16; q += 4) *(float4*)(row + q) = make_float4(p[q], p[q + 1], p[q + 2], p[q + 3]);
}
__device__ __forceinline__ float column_sum(const float* sums, int lane) {
    float t[16];
    #pragma unroll
    for (int i = 0; i < 16; ++i) t[i] = sums[i * 36 + lane % 2 * 16 + lane / 2];
    #pragma unroll
    for (int level = 0; level < 4; ++level) {
        #pragma unroll
        for (int i = 0; i < 16; i += 2 << level) t[i] += t[i + (1 << level)];
    }
    return t[0];
}

// The backward, for the same rows and lanes as the forward (lane 2c + r: states 8r .. 8r + 7 of channel c), over one
// segment of seg_len walk steps (a multiple of CHUNK; one segment: seg_len >= L), walked from its end. Each chunk of
// CHUNK walk steps is recomputed twice from the state the forward saved before it: once forward, keeping the state
// before every CK-th step in shared memory (GRAD_CHECKPOINT: 4, 8 or 16 steps, 16, 8 or 4 KB a warp; past 4, a piece
// first recomputes the steps from the checkpoint before it, 0 to CK - 4), then piece by piece backwards, each piece's
// states and decays in registers, with the adjoint dh taken back over the piece. Its rows come from shared memory,
// copied there while the previous chunk's backward walk ran. du, ddt and dz are (b, l, d) rows like u; dA (b, S, d, n),
// dD and dbias (b, S, d) are sums over the segment; dBC (b, d / 16, l, 2n) holds dB then dC of each step summed over
// the 16 channels (scan.py adds the channel blocks). These are the Triton backward's layouts (triton/scan.py). The
// channel sums of GRAD_SUMS steps (1, 2 or 4; 2.3 KB of shared memory a warp each) are taken together, between one
// pair of barriers, so that the steps' other work can overlap around them.
// With several segments the adjoint runs twice: first ADJ_ONLY, each segment from a zero adjoint at its end, writing
// the adjoint at its start and its sum of dt (seg_adj, seg_dt); after the chaining kernel, again with each segment's
// true incoming adjoint (init).
template <bool REV, bool ADJ_ONLY>
__device__ __forceinline__ void scan_bwd(
    const bf16_t* __restrict__ u, const bf16_t* __restrict__ dt, const float* __restrict__ A,
    const bf16_t* __restrict__ Bm, const bf16_t* __restrict__ Cm, const float* __restrict__ Dv,
    const bf16_t* __restrict__ z, const float* __restrict__ bias, const bf16_t* __restrict__ dout,
    const float* __restrict__ states, const float* __restrict__ init, int L, int D, long long s_Bb, long long s_Bl,
    long long s_Cb, long long s_Cl, int seg_len, float* __restrict__ seg_adj, float* __restrict__ seg_dt,
    bf16_t* __restrict__ du, bf16_t* __restrict__ ddt, bf16_t* __restrict__ dz, float* __restrict__ dA,
    float* __restrict__ dD, float* __restrict__ dbias, float* __restrict__ dBC) {
    constexpr int N = 16, NV = 8, SUB = 4, CK = GRAD_CHECKPOINT, SUMS = GRAD_SUMS;
    static_assert(CK % SUB == 0 && CHUNK % CK == 0, "checkpoints every whole number of pieces");
    static_assert(SUB % SUMS == 0, "channel sums of whole groups of a piece's steps");
    const int lane = threadIdx.x, c = lane / 2, r = lane % 2, n0 = r * NV;
    const int b = blockIdx.y, d = blockIdx.x * 16 + c, seg = blockIdx.z;
    const int start = seg * seg_len, end = min(L, start + seg_len);
    const size_t row0 = (size_t)b * L * D, seg_row = ((size_t)b * gridDim.z + seg) * D + d;
    float A2[NV], dh[NV];
    #pragma unroll
    for (int k = 0; k < NV; ++k) {
        A2[k] = A[d * N + n0 + k] * LOG2E;
        dh[k] = init != nullptr ? init[seg_row * N + n0 + k] : 0.f;
    }
    const float Dd = Dv[d], bias_d = bias[d];
    auto time_of = [&](int i) { return REV ? L - 1 - i : i; };  // of walk step i
    // A chunk's rows (u, dt, z, dout: the warp's 16 channels; B, C: the 16 states) are copied into shared memory with
    // cp.async by walk step within the chunk, and read from there by both walks over it; the backward walk refills
    // each piece's rows with the next chunk's as soon as it is done with them (lanes 0 .. 7 copy: 6 x 8 16-byte vectors
    // per piece).
    __shared__ __align__(16) bf16_t s_u[CHUNK * 16], s_dt[CHUNK * 16], s_z[CHUNK * 16], s_g[CHUNK * 16],
        s_B[CHUNK * N], s_C[CHUNK * N];
    auto copy_piece = [&](int c0, int piece) {  // walk steps c0 + piece SUB .. + SUB - 1
        if (lane < 8 && c0 >= start) {
            const int j = piece * SUB + lane / 2, q = lane % 2, i = c0 + j;
            const bool ok = i < L;
            const int t = ok ? time_of(i) : 0, bytes = ok ? 16 : 0, dst = j * 16 + q * 8;
            const size_t o = row0 + (size_t)t * D + blockIdx.x * 16 + q * 8;
            if (!ADJ_ONLY) cp16(s_u + dst, u + o, bytes);  // the adjoint pass needs neither u nor B
            cp16(s_dt + dst, dt + o, bytes);
            cp16(s_z + dst, z + o, bytes);
            cp16(s_g + dst, dout + o, bytes);
            if (!ADJ_ONLY) cp16(s_B + dst, Bm + b * s_Bb + t * s_Bl + q * 8, bytes);
            cp16(s_C + dst, Cm + b * s_Cb + t * s_Cl + q * 8, bytes);
        }
        cp_commit();
    };
    auto dt_at = [&](int j) { return softplus(bf(s_dt[j * 16 + c]) + bias_d); };  // dt of step j of the chunk
    auto rows = [&](const bf16_t* s, int j, float (&f)[8]) { unpack(*(const uint4*)(s + j * N + n0), f); };
    auto gate = [&](int j, float& zo, float& sig) {  // dout * z * sigmoid(z) of step j of the chunk
        zo = bf(s_z[j * 16 + c]);
        sig = sigmoid(zo);
        return bf(s_g[j * 16 + c]) * zo * sig;
    };
    const int last = (end - 1) / CHUNK * CHUNK;  // the first chunk walked
    for (int piece = 0; piece < CHUNK / SUB; ++piece) copy_piece(last, piece);

    if (ADJ_ONLY) {
        float dt_sum = 0.f;
        for (int c0 = last; c0 >= start; c0 -= CHUNK) {
            cp_wait<0>();
            __syncwarp();
            for (int j = min(end, c0 + CHUNK) - 1 - c0; j >= 0; --j) {
                const float dtv = dt_at(j);
                float zo, sig, Cf[8];
                const float g = gate(j, zo, sig);
                rows(s_C, j, Cf);
                #pragma unroll
                for (int k = 0; k < NV; ++k) dh[k] = (dh[k] + g * Cf[k]) * ex2(dtv * A2[k]);
                dt_sum += dtv;
            }
            __syncwarp();
            for (int piece = 0; piece < CHUNK / SUB; ++piece) copy_piece(c0 - CHUNK, piece);
        }
        #pragma unroll
        for (int k = 0; k < NV; ++k) seg_adj[seg_row * N + n0 + k] = dh[k];
        if (r == 0) seg_dt[seg_row] = dt_sum;
        return;
    }

    __shared__ __align__(16) float s_ck[CHUNK / CK * 32 * NV];  // the state before every CK-th step of a chunk, by lane
    __shared__ __align__(16) float s_sums[SUMS * SUMS_WORDS];  // the channel sums of SUMS steps at a time
    float dA_acc[NV] = {}, dD_acc = 0.f, dbias_acc = 0.f;
    float* const part = dBC + ((size_t)b * (D / 16) + blockIdx.x) * L * (2 * N) + (c < 8 ? 0 : N) + n0 + c % 8;
    auto advance = [&](float (&h)[NV], int j) {  // the state after step j of the chunk, from the one before it
        const float dtv = dt_at(j), dtu = dtv * bf(s_u[j * 16 + c]);
        float Bf[8];
        rows(s_B, j, Bf);
        #pragma unroll
        for (int k = 0; k < NV; ++k) h[k] = fmaf(h[k], ex2(dtv * A2[k]), dtu * Bf[k]);
    };
    for (int c0 = last; c0 >= start; c0 -= CHUNK) {
        const int steps = min(end, c0 + CHUNK) - c0, pieces = (steps + SUB - 1) / SUB;
        for (int piece = pieces; piece < CHUNK / SUB; ++piece) copy_piece(c0 - CHUNK, piece);  // rows not used here
        float h[NV];
        const float* saved = states + (((size_t)b * ((L + CHUNK - 1) / CHUNK) + c0 / CHUNK) * D + d) * N + n0;
        #pragma unroll
        for (int k = 0; k < NV; ++k) h[k] = saved[k];
        cp_wait<0>();
        __syncwarp();
        for (int j0 = 0; j0 < steps; j0 += CK) {  // forward over the chunk, keeping the state before every CK-th step
            float* ck = s_ck + (j0 / CK * 32 + lane) * NV;
            #pragma unroll
            for (int k = 0; k < NV; k += 4) *(float4*)(ck + k) = make_float4(h[k], h[k + 1], h[k + 2], h[k + 3]);
            #pragma unroll
            for (int j = j0; j < j0 + CK; ++j) {
                if (j >= steps) break;
                advance(h, j);
            }
        }
        for (int piece = pieces - 1; piece >= 0; --piece) {  // the pieces backwards
            const int j0 = piece * SUB, k0 = j0 / CK * CK;  // the piece's first step, and the checkpoint before it
            float hs[SUB + 1][NV], a[SUB][NV], dts[SUB];
            const float* ck = s_ck + (k0 / CK * 32 + lane) * NV;
            #pragma unroll
            for (int k = 0; k < NV; ++k) hs[0][k] = ck[k];
            #pragma unroll
            for (int m = 0; m < CK - SUB; ++m) {  // from the checkpoint to the piece (CK > SUB: fewer checkpoints)
                if (k0 + m < j0) advance(hs[0], k0 + m);
            }
            #pragma unroll
            for (int m = 0; m < SUB; ++m) {  // steps past the chunk's end (only in the sequence's last) change nothing
                const int j = j0 + m;
                dts[m] = j < steps ? dt_at(j) : 0.f;
                const float dtu = dts[m] * bf(s_u[j * 16 + c]);
                float Bf[8];
                rows(s_B, j, Bf);
                #pragma unroll
                for (int k = 0; k < NV; ++k) {
                    a[m][k] = ex2(dts[m] * A2[k]);
                    hs[m + 1][k] = fmaf(hs[m][k], a[m][k], dtu * Bf[k]);
                }
            }
            #pragma unroll
            for (int m = SUB - 1; m >= 0; --m) {
                const int j = j0 + m;
                if (j >= steps) continue;
                const int t = time_of(c0 + j);
                const size_t o = row0 + (size_t)t * D + d;
                const float x = bf(s_dt[j * 16 + c]) + bias_d, uo = bf(s_u[j * 16 + c]);
                float zo, sig, Bf[8], Cf[8];
                const float g = gate(j, zo, sig);
                rows(s_B, j, Bf);
                rows(s_C, j, Cf);
                float y = 0.f;
                #pragma unroll
                for (int k = 0; k < NV; ++k) y = fmaf(hs[m + 1][k], Cf[k], y);
                y = pair_sum(y) + Dd * uo;
                const float dzo = bf(s_g[j * 16 + c]) * y * sig * (1.f + zo * (1.f - sig));
                float dhB = 0.f, wA = 0.f, p[2 * NV];
                #pragma unroll
                for (int k = 0; k < NV; ++k) {
                    dh[k] = fmaf(g, Cf[k], dh[k]);
                    dhB = fmaf(dh[k], Bf[k], dhB);
                    const float w = dh[k] * a[m][k] * hs[m][k];
                    wA = fmaf(w, A2[k], wA);
                    dA_acc[k] = fmaf(w, dts[m], dA_acc[k]);
                    p[k] = dh[k] * (dts[m] * uo);
                    p[NV + k] = hs[m + 1][k] * g;
                    dh[k] *= a[m][k];
                }
                dhB = pair_sum(dhB);
                float ddto = pair_sum(wA) * LN2 + uo * dhB;
                if (x <= 20.f) ddto *= sigmoid(x);
                dD_acc = fmaf(g, uo, dD_acc);
                dbias_acc += ddto;
                if (r == 0) {
                    du[o] = to_bf(fmaf(dts[m], dhB, Dd * g));
                    ddt[o] = to_bf(ddto);
                } else {
                    dz[o] = to_bf(dzo);
                }
                put_sums(p, s_sums + m % SUMS * SUMS_WORDS, lane);
                if (m % SUMS == 0) {  // the group of steps m .. m + SUMS - 1, walked down to m
                    __syncwarp();
                    #pragma unroll
                    for (int i = 0; i < SUMS; ++i) {
                        const float sum = column_sum(s_sums + i * SUMS_WORDS, lane);
                        if (j + i < steps) part[(size_t)time_of(c0 + j + i) * (2 * N)] = sum;
                    }
                    __syncwarp();  // the next group's writes wait for every lane's reads
                }
            }
            __syncwarp();  // every lane is done with the piece's rows
            copy_piece(c0 - CHUNK, piece);
        }
    }
    cp_wait<0>();
    #pragma unroll
    for (int k = 0; k < NV; ++k) dA[seg_row * N + n0 + k] = dA_acc[k];
    if (r == 0) {
        dD[seg_row] = dD_acc;
        dbias[seg_row] = dbias_acc;
    }
}

// The entry points: their arguments, the tiles they are compiled with, and their names (scan.py loads them by name;
// the CPU test builds its own entry points from the same macros).
#define SCAN_ARGS const bf16_t* u, const bf16_t* dt, const float* A, const bf16_t* Bm, const bf16_t* Cm,        \
    const float* Dv, const bf16_t* z, const float* bias, bf16_t* out, int L, int D, long long s_Bb,          \
    long long s_Bl, long long s_Cb, long long s_Cl, int seg_blocks, float* seg_state, float* seg_dt,         \
    const float* init, float* states
#define SCAN_CALL u, dt, A, Bm, Cm, Dv, z, bias, out, L, D, s_Bb, s_Bl, s_Cb, s_Cl, seg_blocks, seg_state, seg_dt, \
    init, states
#define SCAN_TILES 8, 16, 4  // NV, T, S
#define SCAN_ENTRY_POINTS(X) \
    X(scan_fwd, false, false) X(scan_rev, true, false) X(scan_fwd_state, false, true) X(scan_rev_state, true, true)
#define GRAD_ARGS const bf16_t* u, const bf16_t* dt, const float* A, const bf16_t* Bm, const bf16_t* Cm,       \
    const float* Dv, const bf16_t* z, const float* bias, const bf16_t* dout, const float* states, const float* init, \
    int L, int D, long long s_Bb, long long s_Bl, long long s_Cb, long long s_Cl, int seg_len, float* seg_adj,      \
    float* seg_dt, bf16_t* du, bf16_t* ddt, bf16_t* dz, float* dA, float* dD, float* dbias, float* dBC
#define GRAD_CALL u, dt, A, Bm, Cm, Dv, z, bias, dout, states, init, L, D, s_Bb, s_Bl, s_Cb, s_Cl, seg_len, seg_adj, \
    seg_dt, du, ddt, dz, dA, dD, dbias, dBC
#define GRAD_ENTRY_POINTS(X) X(grad_fwd, false, false) X(grad_rev, true, false) X(grad_fwd_adjoint, false, true) \
    X(grad_rev_adjoint, true, true)

#ifndef CADUCEUS_SCAN_HOST
#define SCAN_KERNEL(name, rev, state_only) \
    extern "C" __global__ void __launch_bounds__(32) name(SCAN_ARGS) { scan_fwd<SCAN_TILES, rev, state_only>(SCAN_CALL); }
SCAN_ENTRY_POINTS(SCAN_KERNEL)
#define GRAD_KERNEL(name, rev, adj_only) \
    extern "C" __global__ void __launch_bounds__(32) name(GRAD_ARGS) { scan_bwd<rev, adj_only>(GRAD_CALL); }
GRAD_ENTRY_POINTS(GRAD_KERNEL)
#endif
