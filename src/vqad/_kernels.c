/* vqad's fused CPU kernels (loaded by vqad/kernels.py through ctypes; see its docstring).
 *
 * Plain C99 and OpenMP, no PyTorch headers: it compiles in well under a second. Every kernel checks
 * the indices it is handed and returns a non-zero code instead of writing out of bounds; Python turns
 * that code into an error. Built with -ffp-contract=off, so a product and a sum are never fused into
 * one rounding: the arithmetic is the PyTorch ops' arithmetic, in the same order where noted.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever a signature changes: the loader refuses a library with another version. */
int vqad_kernels_abi(void) { return 8; }

int vqad_kernels_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int thread_count(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* A team size for kernels with per-thread tables or scratch: 1 without OpenMP, else 1..256. */
static int team_size(int nthreads) {
#ifndef _OPENMP
    nthreads = 1;
#endif
    return nthreads > 256 ? 256 : (nthreads < 1 ? 1 : nthreads);
}

/* Whether rows (U,) are strictly increasing in [0, M): the rows a sparse gradient or a lookup names. */
static int rows_valid(const int64_t *rows, int64_t U, int64_t M) {
    for (int64_t i = 0; i < U; i++)
        if (rows[i] < 0 || rows[i] >= M || (i > 0 && rows[i] <= rows[i - 1])) return 0;
    return 1;
}

/* The table gradient of an interpolation (the backward of Σ_c w[n,c] T[ids[n,c]]):
 *
 *     out (R, k) = Σ_{n, c : ids[n,c] = r} w[n,c] · g[n]
 *
 * w, ids: (N, C); g: (N, k); out: (R, k), overwritten. Thread t accumulates the entries
 * n in [N t / T, N (t+1) / T) into its own (R, k) buffer (thread 0 into out, thread t > 0 into
 * scratch + (t-1) R k, which must hold (nthreads - 1) R k floats), in entry order; the buffers are then
 * summed into out in thread order. One thread adds exactly as index_add_ does (entry order). The result
 * depends on the thread count only through that split. Returns 1 (and leaves out unspecified) if an
 * id lies outside [0, R). */
int vqad_interp_backward(const float *w, const int64_t *ids, const float *g, float *out, float *scratch,
                         int64_t N, int64_t C, int64_t k, int64_t R, int nthreads) {
    int bad = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
#endif
    {
        int T = thread_count(), t = thread_id();
        float *acc = t == 0 ? out : scratch + (int64_t)(t - 1) * R * k;
        memset(acc, 0, (size_t)(R * k) * sizeof(float));
        int64_t lo = N * t / T, hi = N * (t + 1) / T;
        for (int64_t n = lo; n < hi; n++) {
            const float *gn = g + n * k;
            const float *wn = w + n * C;
            const int64_t *in = ids + n * C;
            for (int64_t c = 0; c < C; c++) {
                int64_t r = in[c];
                if (r < 0 || r >= R) {
                    bad = 1;
                    continue;
                }
                float wc = wn[c];
                float *o = acc + r * k;
                for (int64_t j = 0; j < k; j++) o[j] += wc * gn[j];
            }
        }
        if (T > 1) {
#ifdef _OPENMP
#pragma omp barrier
#endif
            int64_t a = R * k * t / T, b = R * k * (t + 1) / T;
            for (int s = 1; s < T; s++) {
                const float *src = scratch + (int64_t)(s - 1) * R * k;
                for (int64_t i = a; i < b; i++) out[i] += src[i];
            }
        }
    }
    return bad;
}

/* SparseAdam's update of the rows a gradient names (vqad.optim.SparseRowAdam), in place, one pass:
 *
 *     m ← (g − m)(1 − β1) + m,   v ← (g² − v)(1 − β2) + v,   p ← p + (m / (√v + ε)) · (−step_size)
 *
 * p, exp_avg, exp_avg_sq: (M, n); rows: (U,) strictly increasing in [0, M); g: (U, n). Rows are split
 * among threads (distinct rows: no two threads write one row). Returns 1, having changed nothing, if
 * rows are out of range or not strictly increasing. */
int vqad_sparse_adam(float *p, float *exp_avg, float *exp_avg_sq, const int64_t *rows, const float *g,
                     int64_t U, int64_t n, int64_t M, float one_minus_beta1, float one_minus_beta2, float eps,
                     float neg_step_size, int nthreads) {
    if (!rows_valid(rows, U, M)) return 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
    for (int64_t i = 0; i < U; i++) {
        int64_t r = rows[i];
        float *pr = p + r * n, *mr = exp_avg + r * n, *vr = exp_avg_sq + r * n;
        const float *gi = g + i * n;
        for (int64_t j = 0; j < n; j++) {
            float mo = mr[j], vo = vr[j], gg = gi[j];
            float mn = (gg - mo) * one_minus_beta1 + mo;
            float vn = (gg * gg - vo) * one_minus_beta2 + vo;
            mr[j] = mn;
            vr[j] = vn;
            pr[j] += (mn / (sqrtf(vn) + eps)) * neg_step_size;
        }
    }
    return 0;
}

/* The row-wise RMSprop update of the rows a gradient names (vqad.optim.RowwiseSparseRMSprop), in place,
 * one pass over each row:
 *
 *     v_r ← β v_r + (1 − β) · mean_j g_rj²,   t_r ← t_r + 1,
 *     p_rj ← p_rj + (−lr) · g_rj / (√(v_r / (1 − β^t_r)) + ε)
 *
 * p: (M, n); v, t: (M,); rows: (U,) strictly increasing in [0, M); g: (U, n). The mean is summed in
 * double and rounded once (PyTorch's float32 mean adds in another order: v may differ in its last
 * bits). Rows are split among threads (distinct rows: no two threads write one row). Returns 1, having
 * changed nothing, if rows are out of range or not strictly increasing. */
int vqad_sparse_rmsprop(float *p, float *v, float *t, const int64_t *rows, const float *g, int64_t U, int64_t n,
                        int64_t M, float beta, float eps, float neg_lr, int nthreads) {
    if (!rows_valid(rows, U, M)) return 1;
    const float one_minus_beta = 1.0f - beta;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
    for (int64_t i = 0; i < U; i++) {
        int64_t r = rows[i];
        float *pr = p + r * n;
        const float *gi = g + i * n;
        double sq = 0.0;
        for (int64_t j = 0; j < n; j++) sq += (double)gi[j] * (double)gi[j];
        float vn = v[r] * beta + one_minus_beta * (float)(sq / (double)n);
        float tn = t[r] + 1.0f;
        v[r] = vn;
        t[r] = tn;
        float denom = sqrtf(vn / (1.0f - powf(beta, tn))) + eps;
        for (int64_t j = 0; j < n; j++) pr[j] += (gi[j] / denom) * neg_lr;
    }
    return 0;
}

/* out (U,) = argmax over each row of x (U, n), n ≥ 1: the first maximum, or the first NaN if the row
 * has one (torch.argmax's rule). */
void vqad_argmax_rows(const float *x, int64_t *out, int64_t U, int64_t n, int nthreads) {
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static)
#endif
    for (int64_t i = 0; i < U; i++) {
        const float *xi = x + i * n;
        float best = xi[0];
        int64_t arg = 0;
        if (!isnan(best)) {
            for (int64_t j = 1; j < n; j++) {
                float v = xi[j];
                if (isnan(v)) {
                    arg = j;
                    break;
                }
                if (v > best) {
                    best = v;
                    arg = j;
                }
            }
        }
        out[i] = arg;
    }
}

/* -- VQ-AD's soft assignments, fused (vqad.storages.codebook, logits of 2^b >= 64 columns) --------- */

/* e^x for x <= 0 (a softmax row's x − max): Cody–Waite reduction x = n·ln2 + r, |r| <= ln2/2 (n
 * rounded to nearest, ties to even), Cephes' degree-7 expf polynomial, 2^n through the exponent bits;
 * about 2 ulp. Below −87 it returns e^−87 (~1.6e−38; PyTorch gives 0 or a subnormal there). The AVX2
 * loop below computes the same operations in the same order, so both give the same bits. */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float magic = 12582912.0f; /* 1.5 · 2^23: adding it rounds to an integer */
    float n = (x * EXP_LOG2E + magic) - magic;
    float r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    float p = EXP_P0;
    p = p * r + EXP_P1;
    p = p * r + EXP_P2;
    p = p * r + EXP_P3;
    p = p * r + EXP_P4;
    p = p * r + EXP_P5;
    p = p * (r * r) + r + 1.0f;
    union {
        int32_t i;
        float f;
    } two_n;
    two_n.i = ((int32_t)n + 127) << 23;
    return p * two_n.f;
}

/* The first argmax of a row of n values (the first NaN if there is one: torch.argmax's rule) and the
 * value there. */
static int64_t row_argmax_exact(const float *a, int64_t n, float *mx) {
    float best = a[0];
    int64_t arg = 0;
    for (int64_t j = 1; j < n && best == best; j++)
        if (a[j] != a[j] || a[j] > best) {
            best = a[j];
            arg = j;
        }
    *mx = best;
    return arg;
}

#if defined(__AVX2__)
#include <immintrin.h>

static inline float hsum8(__m256 v) {
    float t[8];
    _mm256_storeu_ps(t, v);
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
}

/* row_argmax_exact, 8 lanes each keeping its largest value and where it first saw it; a row with a
 * NaN or an infinity (v − v summed per lane is then NaN) takes the plain loop. */
static inline int64_t row_argmax(const float *restrict a, int64_t n, float *mx) {
    if (n < 8 || n % 8) return row_argmax_exact(a, n, mx);
    __m256 best = _mm256_set1_ps(-INFINITY), fin = _mm256_setzero_ps();
    __m256i at = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8);
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 v = _mm256_loadu_ps(a + j);
        const __m256 take = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
        best = _mm256_blendv_ps(best, v, take);
        at = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(at), _mm256_castsi256_ps(idx), take));
        fin = _mm256_add_ps(fin, _mm256_sub_ps(v, v));
        idx = _mm256_add_epi32(idx, eight);
    }
    if (hsum8(fin) != hsum8(fin)) return row_argmax_exact(a, n, mx);
    float b[8];
    int32_t w[8];
    _mm256_storeu_ps(b, best);
    _mm256_storeu_si256((__m256i *)w, at);
    float m = b[0];
    int64_t arg = w[0];
    for (int l = 1; l < 8; l++)
        if (b[l] > m || (b[l] == m && w[l] < arg)) {
            m = b[l];
            arg = w[l];
        }
    *mx = m;
    return arg;
}

/* s_j = e^(c_j − mx) (mx the row's largest, finite); returns Σ_j s_j. */
static inline float exp_row(const float *restrict c, float mx, float *restrict s, int64_t n) {
    const __m256 vmx = _mm256_set1_ps(mx), lo = _mm256_set1_ps(-87.0f), log2e = _mm256_set1_ps(EXP_LOG2E);
    const __m256 hi_ln2 = _mm256_set1_ps(EXP_LN2_HI), lo_ln2 = _mm256_set1_ps(EXP_LN2_LO), one = _mm256_set1_ps(1.0f);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 x = _mm256_sub_ps(_mm256_loadu_ps(c + j), vmx);
        x = _mm256_max_ps(x, lo); /* x is finite here: max_ps's NaN rule never applies */
        const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(k, hi_ln2));
        r = _mm256_sub_ps(r, _mm256_mul_ps(k, lo_ln2));
        __m256 p = _mm256_set1_ps(EXP_P0);
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P1));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P2));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P3));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P4));
        p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_P5));
        p = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r), one);
        const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        const __m256 v = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
        _mm256_storeu_ps(s + j, v);
        if ((j / 8) % 2)
            acc1 = _mm256_add_ps(acc1, v);
        else
            acc0 = _mm256_add_ps(acc0, v);
    }
    float sum = hsum8(_mm256_add_ps(acc0, acc1));
    for (; j < n; j++) {
        s[j] = exp_nonpositive(c[j] - mx);
        sum += s[j];
    }
    return sum;
}

/* Σ_j a_j b_j in 8 lanes. */
static inline float row_dot(const float *restrict a, const float *restrict b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j)));
    float v = hsum8(acc);
    for (; j < n; j++) v += a[j] * b[j];
    return v;
}
#else
static inline int64_t row_argmax(const float *a, int64_t n, float *mx) { return row_argmax_exact(a, n, mx); }

/* Sums over a row in 16 independent lanes, so that the loop vectorises without reassociation flags. */
#define ROW_LANES 16
static inline float exp_row(const float *restrict c, float mx, float *restrict s, int64_t n) {
    for (int64_t j = 0; j < n; j++) s[j] = exp_nonpositive(c[j] - mx);
    float part[ROW_LANES] = {0.0f};
    int64_t j = 0;
    for (; j + ROW_LANES <= n; j += ROW_LANES)
        for (int l = 0; l < ROW_LANES; l++) part[l] += s[j + l];
    float v = 0.0f;
    for (int l = 0; l < ROW_LANES; l++) v += part[l];
    for (; j < n; j++) v += s[j];
    return v;
}

static inline float row_dot(const float *restrict a, const float *restrict b, int64_t n) {
    float part[ROW_LANES] = {0.0f};
    int64_t j = 0;
    for (; j + ROW_LANES <= n; j += ROW_LANES)
        for (int l = 0; l < ROW_LANES; l++) part[l] += a[j + l] * b[j + l];
    float v = 0.0f;
    for (int l = 0; l < ROW_LANES; l++) v += part[l];
    for (; j < n; j++) v += a[j] * b[j];
    return v;
}
#endif

/* s = softmax(c) of one row of n logits (s: n floats), given the value mx at the row's argmax (row_argmax:
 * the row's largest value, or its first NaN). A NaN, +inf or all −inf row gets an all-NaN s, as
 * PyTorch's softmax gives. */
static inline void softmax_row(const float *restrict c, float mx, float *restrict s, int64_t n) {
    if (mx != mx || mx == INFINITY || mx == -INFINITY) {
        for (int64_t j = 0; j < n; j++) s[j] = NAN;
        return;
    }
    const float inv = 1.0f / exp_row(c, mx, s, n);
    for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

/* Forward of the soft assignments of the rows ``rows (U,)`` (strictly increasing in [0, M)) of the
 * logits C (M, n): best (U,) = each row's argmax, and, if pbar is not NULL, pbar (n,) = the mean of
 * softmax(C[rows[u]]) over u (summed in double, a partial sum per thread, added in thread order).
 * Returns 1, having written nothing, if a row is out of range or the rows are not strictly increasing;
 * -2 if the scratch cannot be allocated. */
int vqad_soft_assign_forward(const float *C, const int64_t *rows, int64_t U, int64_t n, int64_t M, int64_t *best,
                             float *pbar, int nthreads) {
    if (!rows_valid(rows, U, M)) return 1;
    if (!pbar) {
        float mx;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) private(mx)
#endif
        for (int64_t i = 0; i < U; i++) best[i] = row_argmax(C + rows[i] * n, n, &mx);
        return 0;
    }
    nthreads = team_size(nthreads);
    double *acc = (double *)calloc((size_t)nthreads * (size_t)n, sizeof(double));
    float *scratch = (float *)malloc((size_t)nthreads * (size_t)n * sizeof(float));
    if (!acc || !scratch) {
        free(acc);
        free(scratch);
        return -2;
    }
    int used = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        const int T = thread_count(), t = thread_id();
#ifdef _OPENMP
#pragma omp single
#endif
        used = T;
        float *s = scratch + (size_t)t * (size_t)n;
        double *a = acc + (size_t)t * (size_t)n;
        for (int64_t i = U * t / T; i < U * (t + 1) / T; i++) {
            const float *c = C + rows[i] * n;
            float mx;
            best[i] = row_argmax(c, n, &mx);
            softmax_row(c, mx, s, n);
            for (int64_t j = 0; j < n; j++) a[j] += s[j];
        }
    }
    for (int64_t j = 0; j < n; j++) {
        double v = 0.0;
        for (int t = 0; t < used; t++) v += acc[(size_t)t * (size_t)n + (size_t)j];
        pbar[j] = (float)(v / (double)(U > 0 ? U : 1));
    }
    free(acc);
    free(scratch);
    return 0;
}

/* Rows whose ∂D terms are added in float before they join the double sum (bounds the float sums' error) */
#define SOFT_FLUSH 64

/* Backward of the straight-through feature D[best_u] whose gradient is that of softmax(C[rows[u]]) · D,
 * for the gradient g (U, k) of the features and extra (n,) (or NULL) added to every row's gradient of
 * its soft assignment (the rate term's ∂R/∂p̄ / U):
 *
 *     s = softmax(C[rows[u]]),  ∂s_j = D_j · g_u + extra_j,  dC[u]_j = s_j (∂s_j − s · ∂s)   (U, n)
 *     gD (n, k) = Σ_u s_u ⊗ g_u + Σ_u e_{best_u} ⊗ g_u
 *
 * best (U,) must be each row's argmax (vqad_soft_assign_forward's, on the same C): its value is the
 * softmax's shift. DT (k, n) is D transposed (contiguous). A partial gD per thread: float over SOFT_FLUSH rows at a time,
 * double over them all; the threads' partials added in thread order, rounded to float once.
 * Returns 1 if a row or a best index is out of range or the rows are not strictly increasing, -2 if the
 * scratch cannot be allocated (nothing written either way). */
int vqad_soft_assign_backward(const float *C, const int64_t *rows, const int64_t *best, const float *DT,
                              const float *g, const float *extra, int64_t U, int64_t n, int64_t k, int64_t M,
                              float *dC, float *gD, int nthreads) {
    if (!rows_valid(rows, U, M)) return 1;
    for (int64_t i = 0; i < U; i++)
        if (best[i] < 0 || best[i] >= n) return 1;
    nthreads = team_size(nthreads);
    float *part = (float *)calloc((size_t)nthreads * (size_t)(k * n), sizeof(float));
    double *whole = (double *)calloc((size_t)nthreads * (size_t)(k * n), sizeof(double));
    float *scratch = (float *)malloc((size_t)nthreads * (size_t)(2 * n) * sizeof(float));
    if (!part || !whole || !scratch) {
        free(part);
        free(whole);
        free(scratch);
        return -2;
    }
    int used = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        const int T = thread_count(), t = thread_id();
#ifdef _OPENMP
#pragma omp single
#endif
        used = T;
        float *restrict s = scratch + (size_t)t * (size_t)(2 * n);
        float *restrict gs = s + n;
        float *restrict gdt = part + (size_t)t * (size_t)(k * n); /* (k, n): ∂D transposed, SOFT_FLUSH rows */
        double *restrict gdd = whole + (size_t)t * (size_t)(k * n); /* ... and all of this thread's rows */
        const int64_t i0 = U * t / T, i1 = U * (t + 1) / T;
        for (int64_t i = i0; i < i1; i++) {
            if (i > i0 && (i - i0) % SOFT_FLUSH == 0) /* float sums over a few rows, double over them all */
                for (int64_t q = 0; q < k * n; q++) {
                    gdd[q] += gdt[q];
                    gdt[q] = 0.0f;
                }
            const float *restrict gi = g + i * k;
            const float *c = C + rows[i] * n;
            softmax_row(c, c[best[i]], s, n); /* the forward's argmax holds the row's largest value */
            if (extra)
                memcpy(gs, extra, (size_t)n * sizeof(float));
            else
                memset(gs, 0, (size_t)n * sizeof(float));
            for (int64_t c = 0; c < k; c++) {
                const float gc = gi[c];
                const float *restrict d = DT + c * n;
                float *restrict acc = gdt + c * n;
                for (int64_t j = 0; j < n; j++) {
                    gs[j] += d[j] * gc;
                    acc[j] += s[j] * gc;
                }
                acc[best[i]] += gc;
            }
            const float dot = row_dot(s, gs, n);
            float *restrict out = dC + i * n;
            for (int64_t j = 0; j < n; j++) out[j] = s[j] * (gs[j] - dot);
        }
        for (int64_t q = 0; q < k * n; q++) gdd[q] += gdt[q];
    }
    for (int64_t j = 0; j < n; j++)
        for (int64_t c = 0; c < k; c++) {
            double v = 0.0;
            for (int t = 0; t < used; t++) v += whole[(size_t)t * (size_t)(k * n) + (size_t)(c * n + j)];
            gD[j * k + c] = (float)v;
        }
    free(part);
    free(whole);
    free(scratch);
    return 0;
}

/* Where N points x (N, 3) fall at a level of 2^L cells per axis, for the points in occupied cells
 * (SparseOctree.interpolation's compact query, for levels with a dense cell table):
 *
 *   table (8^L,) int32: each cell's occupied-cell index (x-major), -1 if empty;
 *   corners (n_cells, 8) int64: each occupied cell's corner vertex ids.
 *
 * Writes valid (N,) as 0/1 and, for the n_valid points in occupied cells in increasing order, rows
 * (n_valid,), vid (n_valid, 8) and the trilinear weights w (n_valid, 8) (corner c = (ox<<2)|(oy<<1)|oz,
 * w_c = ((w_x · w_y) · w_z) with w_a = t_a or 1 − t_a, t = (x + 1) · 2^L / 2 − ijk): the PyTorch ops'
 * arithmetic. cell (N,) int64 is scratch. Returns n_valid, or −1 if a table entry lies outside
 * [−1, n_cells). A point outside [−1, 1]^3 (or with a NaN) is not valid. */
int64_t vqad_level_query(const float *x, int64_t N, int level, const int32_t *table, int64_t n_cells,
                         const int64_t *corners, uint8_t *valid, int64_t *rows, int64_t *vid, float *w,
                         int64_t *cell, int nthreads) {
    const int64_t res = (int64_t)1 << level;
    const float half_res = 0.5f * (float)res;
    int bad = 0;
    int64_t counts[257];
    if (nthreads > 256) nthreads = 256;
    int used = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) reduction(| : bad)
#endif
    {
        int T = thread_count(), t = thread_id();
#ifdef _OPENMP
#pragma omp single
#endif
        used = T;
        int64_t lo = N * t / T, hi = N * (t + 1) / T, count = 0;
        for (int64_t n = lo; n < hi; n++) {
            const float *p = x + 3 * n;
            int64_t c = -1;
            if (p[0] >= -1.0f && p[0] <= 1.0f && p[1] >= -1.0f && p[1] <= 1.0f && p[2] >= -1.0f && p[2] <= 1.0f) {
                int64_t ijk[3];
                for (int a = 0; a < 3; a++) {
                    float y = (p[a] + 1.0f) * half_res; /* >= 0 here (p >= -1): truncation is floor, no libm call; */
                    int64_t v = (int64_t)y;             /* rounded to float first, as floorf's argument was */
                    ijk[a] = v < 0 ? 0 : (v > res - 1 ? res - 1 : v);
                }
                int32_t e = table[(ijk[0] * res + ijk[1]) * res + ijk[2]];
                if (e < -1 || e >= n_cells) bad = 1;
                else c = e;
            }
            cell[n] = c;
            valid[n] = c >= 0;
            count += c >= 0;
        }
        counts[t + 1] = count;
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
        {
            counts[0] = 0;
            for (int s = 1; s <= T; s++) counts[s] += counts[s - 1];
        }
        int64_t at = counts[t];
        for (int64_t n = lo; n < hi; n++) {
            int64_t c = cell[n];
            if (c < 0) continue;
            const float *p = x + 3 * n;
            float wa[3][2];
            for (int a = 0; a < 3; a++) {
                float y = (p[a] + 1.0f) * half_res; /* a valid point: >= 0, as above */
                int64_t v = (int64_t)y;
                v = v < 0 ? 0 : (v > res - 1 ? res - 1 : v);
                float ta = (p[a] + 1.0f) * half_res - (float)v;
                wa[a][0] = 1.0f - ta;
                wa[a][1] = ta;
            }
            rows[at] = n;
            const int64_t *cc = corners + 8 * c;
            int64_t *vo = vid + 8 * at;
            float *wo = w + 8 * at;
            for (int k = 0; k < 8; k++) {
                vo[k] = cc[k];
                wo[k] = (wa[0][(k >> 2) & 1] * wa[1][(k >> 1) & 1]) * wa[2][k & 1];
            }
            at++;
        }
    }
    return bad ? -1 : counts[used];
}

/* torch.unique(ids, return_inverse=True) for ids (E,) in [0, m): uniq (U,) sorted, inv (E,) each id's
 * position in uniq; rank (m,) int64 is scratch. Returns U, or −1 (nothing useful written) if an id lies
 * outside [0, m). One thread: the marking is a scatter, and its cost is the memory traffic. */
int64_t vqad_unique_rows(const int64_t *ids, int64_t E, int64_t m, int64_t *rank, int64_t *uniq, int64_t *inv) {
    memset(rank, 0, (size_t)m * sizeof(int64_t));
    for (int64_t e = 0; e < E; e++) {
        int64_t r = ids[e];
        if (r < 0 || r >= m) return -1;
        rank[r] = 1;
    }
    int64_t U = 0;
    for (int64_t r = 0; r < m; r++) {
        if (rank[r]) {
            uniq[U] = r;
            rank[r] = U++;
        }
    }
    for (int64_t e = 0; e < E; e++) inv[e] = rank[ids[e]];
    return U;
}

/* -- octree tables of a decoded file (vqad.octree.corner_tables, vqad.entropy.octree_contexts) ---- */

/* Bit counts. With the CPU's popcnt instruction (x86: vqad/kernels.py adds -mpopcnt where the CPU
 * reports it; aarch64 has one) the builtin is one instruction; without it gcc's __builtin_popcountll is
 * a library call, several times slower than these few shifts (measured on level 7 of a file). */
static inline int64_t popcount64(uint64_t v) {
#if defined(__POPCNT__) || defined(__aarch64__)
    return (int64_t)__builtin_popcountll(v);
#else
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int64_t)((v * 0x0101010101010101ULL) >> 56);
#endif
}

/* The position of the lowest set bit of v != 0 (one bsf / tzcnt / rbit+clz instruction). */
static inline int64_t lowest_bit(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return (int64_t)__builtin_ctzll(v);
#else
    return popcount64((v & (0 - v)) - 1);
#endif
}

/* The bits of each axis (x, y, z) in a Morton code: bit 2, 1, 0 of every 3-bit group. */
static const uint64_t AXIS_MASK[3] = {0x1249249249249249ULL << 2, 0x1249249249249249ULL << 1, 0x1249249249249249ULL};

/* The (L + 1)-bit Morton keys of the 8 corner vertices of the cell with Morton code q, corner
 * c = ox·4 + oy·2 + oz, by adding in Morton space (vqad.octree._corner_codes). */
static inline void corner_keys(uint64_t q, uint64_t key[8]) {
    uint64_t lo[3], hi[3];
    for (int a = 0; a < 3; a++) {
        lo[a] = q & AXIS_MASK[a];
        hi[a] = ((lo[a] | ~AXIS_MASK[a]) + 1) & AXIS_MASK[a]; /* this axis's coordinate + 1 */
    }
    for (int c = 0; c < 8; c++)
        key[c] = ((c & 4) ? hi[0] : lo[0]) | ((c & 2) ? hi[1] : lo[1]) | ((c & 1) ? hi[2] : lo[2]);
}

#define CORNER_MAX_THREADS 8

/* Corner vertex ids of the cells of one level (L <= 8), numbered in the Morton order of the vertices'
 * (L + 1)-bit keys, as vqad.octree._corner_tables_dense numbers them:
 *
 *   codes (n,): the cells' Morton codes in [0, 8^L) (any order; duplicates allowed);
 *   corners (n, 8), out: corner c = ox·4 + oy·2 + oz of cell i is the rank of its key among the keys
 *     below 8^L (the vertices inside the cube's far faces), or -1 - key for a vertex on a far face
 *     (its key is >= 8^L; the caller numbers those after the others);
 *   keys (capacity min(8n, 8^L)), out: the distinct keys below 8^L, increasing;
 *   n_far, out: how many corners lie on a far face.
 *
 * Thread t (at most CORNER_MAX_THREADS: the bitmaps take nthreads · 8^L / 8 bytes, 16 MB at level 8,
 * and their merge reads them all) marks the keys of its cells in its own bitmap of 8^L bits; each thread then ORs a range of
 * words of all bitmaps together, counts their bits, and after a prefix sum over the threads' counts
 * writes the ranks and keys of its words. The keys are computed twice rather than stored: writing and
 * re-reading 8n of them cost more than the bit arithmetic. Returns the number of keys written, -1 if
 * a code lies outside [0, 8^L) or L is outside 0..8, or -2 if the bitmaps cannot be allocated. */
int64_t vqad_corner_tables(const int64_t *codes, int64_t n, int level, int64_t *corners, int64_t *keys,
                           int64_t *n_far, int nthreads) {
    if (level < 0 || level > 8) return -1;
    const uint64_t B = (uint64_t)1 << (3 * level);
    const int64_t W = (int64_t)((B + 63) / 64);
    for (int64_t i = 0; i < n; i++)
        if (codes[i] < 0 || (uint64_t)codes[i] >= B) return -1;
    nthreads = team_size(nthreads);
    if (nthreads > CORNER_MAX_THREADS) nthreads = CORNER_MAX_THREADS;
    uint64_t *bits = (uint64_t *)calloc((size_t)W * (size_t)nthreads, sizeof(uint64_t));
    int64_t *rank = (int64_t *)malloc((size_t)W * sizeof(int64_t));
    if (!bits || !rank) {
        free(bits);
        free(rank);
        return -2;
    }
    int64_t counts[CORNER_MAX_THREADS + 1] = {0};
    int used = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        const int T = thread_count(), t = thread_id();
#ifdef _OPENMP
#pragma omp single
#endif
        used = T;
        uint64_t *mine = bits + (size_t)W * (size_t)t;
        for (int64_t i = n * t / T; i < n * (t + 1) / T; i++) {
            uint64_t key[8];
            corner_keys((uint64_t)codes[i], key);
            for (int c = 0; c < 8; c++)
                if (key[c] < B) mine[key[c] >> 6] |= (uint64_t)1 << (key[c] & 63);
        }
#ifdef _OPENMP
#pragma omp barrier
#endif
        const int64_t w0 = W * t / T, w1 = W * (t + 1) / T;
        int64_t count = 0;
        for (int64_t w = w0; w < w1; w++) {
            uint64_t word = bits[w];
            for (int s = 1; s < T; s++) word |= bits[(size_t)W * (size_t)s + (size_t)w];
            bits[w] = word;
            count += popcount64(word);
        }
        counts[t + 1] = count;
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
        for (int s = 1; s <= T; s++) counts[s] += counts[s - 1];
        int64_t m = counts[t];
        for (int64_t w = w0; w < w1; w++) {
            rank[w] = m;
            for (uint64_t word = bits[w]; word; word &= word - 1) keys[m++] = 64 * w + lowest_bit(word);
        }
    }
    const int64_t m = counts[used];
    int64_t far = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : far)
#endif
    for (int64_t i = 0; i < n; i++) {
        uint64_t key[8];
        corner_keys((uint64_t)codes[i], key);
        int64_t *out = corners + 8 * i;
        for (int c = 0; c < 8; c++) {
            uint64_t k = key[c];
            if (k < B) {
                out[c] = rank[k >> 6] + popcount64(bits[k >> 6] & ((((uint64_t)1) << (k & 63)) - 1));
            } else {
                out[c] = -1 - (int64_t)k;
                far++;
            }
        }
    }
    *n_far = far;
    free(bits);
    free(rank);
    return m;
}

/* Is the cell with dilated axis values (x, y, z) occupied? Bitmap (L <= 8) or binary search. */
static int occupied_cell(uint64_t code, const uint64_t *bits, const int64_t *codes, int64_t n) {
    if (bits) return (int)((bits[code >> 6] >> (code & 63)) & 1);
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if ((uint64_t)codes[mid] < code) lo = mid + 1;
        else hi = mid;
    }
    return lo < n && (uint64_t)codes[lo] == code;
}

/* The octree coder's contexts (vqad.entropy.octree_contexts): for each cell P of level L (codes (n,),
 * Morton) and child c, with d = 2·(c>>2 & 1, c>>1 & 1, c & 1) − 1, bit t−1 (t = 1..7) of ctx[8i + c]
 * is set when the level-L cell at P + ((t>>2 & 1)·d_x, (t>>1 & 1)·d_y, (t & 1)·d_z) is occupied; cells
 * outside the cube are empty. Levels up to 8 mark the cells in a bitmap of 8^L bits; finer levels
 * search the codes, which must then be strictly increasing. Cells are split between nthreads threads.
 * counts (128,), if not NULL, receives how many child bits have each context (the coder's group sizes).
 * Returns 0, -1 if a code lies outside
 * [0, 8^L) or L outside 0..20, -2 if the bitmap cannot be allocated, -3 if a finer level's codes are
 * not strictly increasing. */
int vqad_octree_contexts(const int64_t *codes, int64_t n, int level, uint8_t *ctx, int64_t *counts, int nthreads) {
    if (level < 0 || level > 20) return -1;
    const uint64_t B = (uint64_t)1 << (3 * level);
    uint64_t *bits = NULL;
    if (level <= 8) {
        bits = (uint64_t *)calloc((size_t)((B + 63) / 64), sizeof(uint64_t));
        if (!bits) return -2;
    }
    for (int64_t i = 0; i < n; i++) {
        if (codes[i] < 0 || (uint64_t)codes[i] >= B) {
            free(bits);
            return -1;
        }
        if (bits) bits[(uint64_t)codes[i] >> 6] |= (uint64_t)1 << ((uint64_t)codes[i] & 63);
        else if (i && codes[i] <= codes[i - 1]) return -3;
    }
    /* nb[c][t-1]: the neighbour (numbered (dx+1)·9 + (dy+1)·3 + dz+1) that bit t-1 of child c reads */
    int nb[8][7];
    for (int c = 0; c < 8; c++) {
        int d[3] = {2 * ((c >> 2) & 1) - 1, 2 * ((c >> 1) & 1) - 1, 2 * (c & 1) - 1};
        for (int t = 1; t < 8; t++)
            nb[c][t - 1] = (((t >> 2) & 1) * d[0] + 1) * 9 + (((t >> 1) & 1) * d[1] + 1) * 3 + (t & 1) * d[2] + 1;
    }
    int64_t hist[128] = {0};
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : hist[:128])
#endif
    for (int64_t i = 0; i < n; i++) {
        uint64_t q = (uint64_t)codes[i], v[3][3]; /* v[a][o + 1]: axis a's dilated coordinate + o */
        int ok[3][3];
        for (int a = 0; a < 3; a++) {
            uint64_t M = AXIS_MASK[a] & (B - 1), x = q & M;
            v[a][0] = (x - 1) & M;
            ok[a][0] = x != 0;
            v[a][1] = x;
            ok[a][1] = 1;
            v[a][2] = ((x | ~M) + 1) & M;
            ok[a][2] = x != M;
        }
        uint8_t occ[27];
        for (int dx = 0; dx < 3; dx++)
            for (int dy = 0; dy < 3; dy++)
                for (int dz = 0; dz < 3; dz++) {
                    int k = dx * 9 + dy * 3 + dz;
                    occ[k] = k != 13 && ok[0][dx] && ok[1][dy] && ok[2][dz] &&
                             occupied_cell(v[0][dx] | v[1][dy] | v[2][dz], bits, codes, n);
                }
        uint8_t *out = ctx + 8 * i;
        for (int c = 0; c < 8; c++) {
            unsigned acc = 0;
            for (int t = 0; t < 7; t++) acc |= (unsigned)occ[nb[c][t]] << t;
            out[c] = (uint8_t)acc;
            hist[acc]++;
        }
    }
    if (counts) memcpy(counts, hist, sizeof hist);
    free(bits);
    return 0;
}

/* The same contexts from the level's corner table (vqad.octree.corner_tables of its cells): corner c of
 * cell i is the vertex corners[8i + c] in [0, m). The 8 cells around a vertex touch it with 8 different
 * corner indices, so one byte per vertex, bit c' set when the cell that touches it with corner c' is
 * occupied, holds the occupancy of the 2×2×2 block of cells around it. The neighbour t of child c of
 * cell P (offset ((t>>2 & 1)·d_x, (t>>1 & 1)·d_y, (t & 1)·d_z)) touches P's corner c with corner c ^ t,
 * so context bit t−1 is bit c ^ t of that corner's byte: two passes over the table (mark, read) instead
 * of 26 neighbour lookups per cell. counts (128,), if not NULL, receives each context's count.
 * Returns 0, -1 if a vertex id lies outside [0, m), -2 if the bytes cannot be allocated. */
int vqad_octree_contexts_from_corners(const int64_t *corners, int64_t n, int64_t m, uint8_t *ctx, int64_t *counts) {
    uint8_t *block = (uint8_t *)calloc((size_t)(m > 0 ? m : 1), 1);
    if (!block) return -2;
    for (int64_t e = 0; e < 8 * n; e++) {
        const int64_t v = corners[e];
        if (v < 0 || v >= m) {
            free(block);
            return -1;
        }
        block[v] |= (uint8_t)(1u << (e & 7));
    }
    uint8_t lut[8][256]; /* lut[c][byte]: the context of child c given its corner's byte */
    for (int c = 0; c < 8; c++)
        for (int b = 0; b < 256; b++) {
            unsigned acc = 0;
            for (int t = 1; t < 8; t++) acc |= (unsigned)((b >> (c ^ t)) & 1) << (t - 1);
            lut[c][b] = (uint8_t)acc;
        }
    int64_t hist[128] = {0};
    for (int64_t e = 0; e < 8 * n; e++) {
        const uint8_t x = lut[e & 7][block[corners[e]]];
        ctx[e] = x;
        hist[x]++;
    }
    if (counts) memcpy(counts, hist, sizeof hist);
    free(block);
    return 0;
}

/* The coarser vertex of each vertex (vqad.octree.SparseOctree.coarser_vertices): fine (m,) the vertex
 * keys of level L, non-decreasing once shifted right by 3 (vertex ids follow the Morton order), and
 * coarse (n,) the keys of level L − 1, strictly increasing; out[i] is the j with coarse[j] = fine[i] >> 3,
 * found by one merge of the two sorted lists. Returns 0, or -1 if some fine[i] >> 3 is not among the
 * coarse keys (or the lists are out of order): nothing an octree of this package makes. */
int vqad_coarser_vertices(const int64_t *fine, int64_t m, const int64_t *coarse, int64_t n, int64_t *out) {
    int64_t j = 0;
    for (int64_t i = 0; i < m; i++) {
        const int64_t f = fine[i] >> 3;
        while (j < n && coarse[j] < f) j++;
        if (j == n || coarse[j] != f) return -1;
        out[i] = j;
    }
    return 0;
}

/* Children's Morton codes from their parents' codes (n,) and child masks (n,) (bit c: child c
 * occupied; vqad.octree.SparseOctree.codes_from_child_masks): out (capacity 8n) receives
 * (parent << 3) | c for every set bit, parents in order, children in order. Returns the count, or -1
 * if a parent code is negative or too large to shift (>= 2^60). */
int64_t vqad_children(const int64_t *parents, const uint8_t *masks, int64_t n, int64_t *out) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        if (parents[i] < 0 || parents[i] >= ((int64_t)1 << 60)) return -1;
        for (unsigned mask = masks[i]; mask; mask &= mask - 1) {
            unsigned c = (unsigned)lowest_bit(mask);
            out[m++] = (parents[i] << 3) | (int64_t)c;
        }
    }
    return m;
}

/* The inverse of grouping symbols by context (a stable sort by context, as the coders send them):
 * position p, of context ctx[p] in [0, K), takes the next value of its group, whose first value is at
 * sorted[start[ctx[p]]] (start (K,) as an exclusive prefix sum of the groups' sizes; it is advanced
 * in place). Two forms: values int64 -> out int64 (index chunks, ctx int64), and bits uint8 with
 * 8 positions a cell -> masks (n8 / 8,) uint8 (octree chunks, ctx uint8; a non-zero value is a set
 * bit). Returns -1 if the groups do not tile [0, n) in order (start[0] = 0, each start <= the next
 * <= n), a context lies outside [0, K) or a group runs out (its end: the next group's start, or n
 * for the last), -2 (vqad_ungroup) if it cannot allocate K ends, else 0. */
int vqad_ungroup(const int64_t *ctx, int64_t n, int64_t K, const int64_t *sorted, int64_t *start, int64_t *out) {
    if (K < 1 || start[0] != 0) return -1;
    int64_t *end = (int64_t *)malloc((size_t)K * sizeof(int64_t));
    if (!end) return -2;
    int bad = 0;
    for (int64_t j = 0; j < K; j++) {
        end[j] = j + 1 < K ? start[j + 1] : n;
        if (end[j] < start[j] || end[j] > n) bad = 1; /* groups must tile [0, n) in order */
    }
    for (int64_t p = 0; p < n && !bad; p++) {
        int64_t j = ctx[p];
        if (j < 0 || j >= K || start[j] >= end[j]) bad = 1;
        else out[p] = sorted[start[j]++];
    }
    free(end);
    return bad ? -1 : 0;
}

int vqad_ungroup_bits(const uint8_t *ctx, int64_t n8, int64_t K, const uint8_t *sorted, int64_t *start,
                      uint8_t *masks) {
    int64_t end[256];
    if (K < 1 || K > 256 || n8 % 8 || start[0] != 0) return -1;
    for (int64_t j = 0; j < K; j++) {
        end[j] = j + 1 < K ? start[j + 1] : n8;
        if (end[j] < start[j] || end[j] > n8) return -1; /* groups must tile [0, n8) in order */
    }
    for (int64_t i = 0; i < n8 / 8; i++) {
        unsigned mask = 0;
        for (int c = 0; c < 8; c++) {
            int64_t j = ctx[8 * i + c];
            if (j >= K || start[j] >= end[j]) return -1;
            mask |= (unsigned)(sorted[start[j]++] != 0) << c; /* any non-zero value is a set bit, as np.packbits reads it */
        }
        masks[i] = (uint8_t)mask;
    }
    return 0;
}

/* -- range decoding of the coders' payloads (vqad.entropy) -----------------------------------------
 *
 * The payloads are written by constriction's RangeEncoder (32-bit words, a 64-bit state) with models
 * Categorical(p, perfect=False) at 24-bit precision; these functions decode them exactly as its
 * RangeDecoder does, without a call into Python per group. The state (lower, range, point, next word)
 * lives in st[4] so a caller can decode a payload in several calls (the octree coder: one per level);
 * vqad_range_start sets it up as the decoder's constructor does: point = the first two words
 * (big-endian; a missing word reads as zero bits), lower = 0, range = 2^64 − 1.
 *
 * One symbol: scale = range >> 24; the symbol s is the one with cdf[s] ≤ (point − lower) / scale <
 * cdf[s + 1] (found here by comparing point − lower against scale · cdf[·]: no division); lower +=
 * scale · cdf[s], range = scale · (cdf[s + 1] − cdf[s]); when range < 2^32, lower, range and point shift
 * left by a word and the next word (zero bits past the end) enters point. A quotient ≥ 2^24 cannot come
 * from an encoder: the data is invalid (constriction's InvalidData), and the functions return -1.
 *
 * The model of a group is a cdf of A + 1 entries (cdf[0] = 0, cdf[A] = 2^24, strictly increasing), as
 * constriction quantizes float probabilities p (A of them, perfect=False): cdf[i] = trunc(c_i · (2^24 −
 * A) / Σp) + i with c_i the sum of p[0..i) (vqad.entropy builds these; its probabilities are dyadic, so
 * every sum and product is exact). Groups are decoded one after the other, sizes[j] symbols with model
 * j. */
#define RANGE_PRECISION 24
#define RANGE_SCAN_MAX 32

void vqad_range_start(const uint32_t *words, int64_t n_words, uint64_t *st) {
    uint64_t point = 0;
    int64_t pos = 0;
    for (; pos < 2 && pos < n_words; pos++) point = (point << 32) | words[pos];
    if (pos == 1) point <<= 32;
    st[0] = 0;
    st[1] = ~(uint64_t)0;
    st[2] = point;
    st[3] = (uint64_t)pos;
}

static inline void range_renorm(uint64_t *lower, uint64_t *range, uint64_t *point, uint64_t *pos,
                                const uint32_t *words, int64_t n_words) {
    if (*range < ((uint64_t)1 << 32)) {
        *lower <<= 32;
        *range <<= 32;
        *point <<= 32;
        if ((int64_t)*pos < n_words) *point |= words[(*pos)++];
    }
}

/* Binary groups: cut[j] = cdf[1] of group j's model (in 1 .. 2^24 − 1); the bits go to out (Σ sizes)
 * as 0/1 bytes. Returns 0, or -1 on invalid data (out then holds what was decoded before it). */
int vqad_range_decode_bits(uint64_t *st, const uint32_t *words, int64_t n_words, const int64_t *cut,
                           const int64_t *sizes, int64_t K, uint8_t *out) {
    uint64_t lower = st[0], range = st[1], point = st[2], pos = st[3];
    int bad = 0;
    for (int64_t j = 0; j < K && !bad; j++) {
        const uint64_t c1 = (uint64_t)cut[j], c0 = ((uint64_t)1 << RANGE_PRECISION) - c1;
        for (int64_t i = 0; i < sizes[j]; i++) {
            const uint64_t scale = range >> RANGE_PRECISION, d = point - lower, at = scale * c1;
            if (d >= at) {
                if (d - at >= scale * c0) { bad = 1; break; } /* quotient ≥ 2^24 */
                lower += at;
                range = scale * c0;
                *out++ = 1;
            } else {
                range = at;
                *out++ = 0;
            }
            range_renorm(&lower, &range, &point, &pos, words, n_words);
        }
    }
    st[0] = lower; st[1] = range; st[2] = point; st[3] = pos;
    return bad ? -1 : 0;
}

/* Groups over an alphabet of A symbols: group j uses the cdf row table[j] of cdf (T × (A + 1)) (the
 * caller checks 0 ≤ table[j] < T for every group with symbols); the symbols go to out (Σ sizes) as int64.
 * Returns 0, or -1 on invalid data. */
int vqad_range_decode_symbols(uint64_t *st, const uint32_t *words, int64_t n_words, const uint32_t *cdf,
                              int64_t A, const int64_t *table, const int64_t *sizes, int64_t K, int64_t *out) {
    uint64_t lower = st[0], range = st[1], point = st[2], pos = st[3];
    int bad = 0;
    for (int64_t j = 0; j < K && !bad; j++) {
        if (sizes[j] <= 0) continue;
        const uint32_t *row = cdf + table[j] * (A + 1);
        for (int64_t i = 0; i < sizes[j]; i++) {
            const uint64_t scale = range >> RANGE_PRECISION, d = point - lower;
            if (d >= scale * ((uint64_t)1 << RANGE_PRECISION)) { bad = 1; break; }
            /* the last s with scale · row[s] ≤ d (row[0] = 0 qualifies): small alphabets count the entries
             * at or below d (independent products: no chain of dependent loads), large ones halve
             * [lo, lo + n) without branches */
            int64_t lo = 0;
            if (A <= RANGE_SCAN_MAX) {
                for (int64_t t = 1; t < A; t++) lo += scale * row[t] <= d;
            } else {
                for (int64_t n = A; n > 1;) {
                    const int64_t half = n >> 1;
                    lo = scale * row[lo + half] <= d ? lo + half : lo;
                    n -= half;
                }
            }
            lower += scale * row[lo];
            range = scale * (uint64_t)(row[lo + 1] - row[lo]);
            *out++ = lo;
            range_renorm(&lower, &range, &point, &pos, words, n_words);
        }
    }
    st[0] = lower; st[1] = range; st[2] = point; st[3] = pos;
    return bad ? -1 : 0;
}

/* Ray marching through a contracted scene: OccupancySampler._march_contracted (vqad/nerf/render.py) and
 * the contraction g of vqad/nerf/contraction.py, with outer scale A > 1 and k = 1 − 1/A.
 *
 *   o, d (R, 3): scene-space origins and unit directions; t_in, t_out (R,): each ray's segment (no
 *   samples unless t_in < t_out); u (R,): the first interval's length in steps (the jitter);
 *   occ (res³) 0/1 bytes, res = 2^level: the occupancy of the grid cells, flat index (i·res + j)·res + l.
 *
 * Per ray, at most max_iter intervals: h = u·step for the first, step after it; dt = h / |J(x(t)) d|,
 * then dt = h / |J(x(t + dt/2)) d| (the midpoint's speed); t1 = min(t + dt, t_out); the interval
 * [t, t1] is a sample when the cell of g(x((t + t1)/2)) is occupied; the ray ends when t1 ≥ t_out.
 * Computed in double, with one division per speed and per contraction where the PyTorch form divides
 * several times: the PyTorch form run on float64 tensors gives the same samples up to rounding (a
 * midpoint within ~1e-15 of a cell boundary may fall on the other side) and to the outputs' float32
 * rounding; its float32 run, as on CUDA, drifts by ~1e-5 along a ray. A NaN midpoint is no sample.
 * Writes the samples ts, te (float32) and ri (int64) ray after ray, front to back; each buffer must hold R · max_iter entries (thread t first writes from its first ray · max_iter on).
 * Returns the number of samples, or −1 if a thread's scratch (2 · MARCH_LANES · max_iter floats) could not be allocated. */
static inline double speed_d(const double *x, const double *d, double c1, double kinv) {
    int m = 0;
    double ax = fabs(x[0]);
    if (fabs(x[1]) > ax) { ax = fabs(x[1]); m = 1; }
    if (fabs(x[2]) > ax) { ax = fabs(x[2]); m = 2; }
    if (!(ax > 1.0)) return 0.5;
    double q = 1.0 / ax; /* one division: s = c1/r − 1/(k r²), s' = −c1/r² + 2/(k r³) */
    double s = c1 * q - kinv * (q * q);
    double ds = -c1 * (q * q) + 2.0 * kinv * (q * q * q);
    double dr = (x[m] > 0.0 ? 1.0 : (x[m] < 0.0 ? -1.0 : 0.0)) * d[m];
    double j0 = s * d[0] + x[0] * (ds * dr), j1 = s * d[1] + x[1] * (ds * dr), j2 = s * d[2] + x[2] * (ds * dr);
    return 0.5 * sqrt(j0 * j0 + j1 * j1 + j2 * j2);
}

/* The grid cell (ijk) of the contraction of x, by truncation (no libm call: a coordinate below the grid
 * clamps to cell 0); 0 if it is NaN. */
static inline int midpoint_cell(const double *x, double kinv, double half_res, int64_t res, int64_t *ijk) {
    double ax = fabs(x[0]);
    if (fabs(x[1]) > ax) ax = fabs(x[1]);
    if (fabs(x[2]) > ax) ax = fabs(x[2]);
    if (ax < 1e-12) ax = 1e-12;
    double s = 1.0;
    if (ax > 1.0) {
        double q = 1.0 / ax;
        s = (1.0 + (1.0 - q) * kinv) * q;
    }
    for (int a = 0; a < 3; a++) {
        double y = (x[a] * (0.5 * s) + 1.0) * half_res;
        if (y != y) return 0; /* NaN: no cell */
        ijk[a] = y < 1.0 ? 0 : (y >= (double)res ? res - 1 : (int64_t)y);
    }
    return 1;
}

/* The march kernels' samples, written by thread t from offset from[t] (n[t] of them), moved together in
 * thread order (each block moves down, never over one not yet moved). Returns the total. */
static int64_t pack_blocks(float *ts, float *te, int64_t *ri, const int64_t *from, const int64_t *n, int used) {
    int64_t total = 0;
    for (int t = 0; t < used; t++) {
        if (from[t] != total && n[t]) {
            memmove(ts + total, ts + from[t], n[t] * sizeof(float));
            memmove(te + total, te + from[t], n[t] * sizeof(float));
            memmove(ri + total, ri + from[t], n[t] * sizeof(int64_t));
        }
        total += n[t];
    }
    return total;
}

#define MARCH_LANES 4 /* rays marched side by side by one thread, in lockstep stages: their dependency chains
                           * (five divisions and two square roots per interval) overlap in the CPU's pipeline.
                           * A group runs until its longest ray ends, so more lanes waste more: on the generated
                           * room's training rays (one thread) 4 lanes took 15 ms, 8 took 19, 2 took 17, and the
                           * one-ray-at-a-time loop of 8 interleaved rays before it 27 */

int64_t vqad_march_contracted(const float *o, const float *d, const float *t_in, const float *t_out, const float *u,
                              int64_t R, const uint8_t *occ, int level, double step, double A, int64_t max_iter,
                              float *ts, float *te, int64_t *ri, int nthreads) {
    const int64_t res = (int64_t)1 << level;
    const double half_res = 0.5 * (double)res, kinv = 1.0 / (1.0 - 1.0 / A), c1 = 1.0 + kinv;
    int64_t counts[257], from[257];
    nthreads = team_size(nthreads);
    int used = 1, failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        int T = thread_count(), t = thread_id();
#ifdef _OPENMP
#pragma omp single
#endif
        used = T;
        int64_t lo = R * t / T, hi = R * (t + 1) / T, at = lo * max_iter;
        /* the lanes write into a small scratch that stays in cache, then their samples are copied out
         * packed: writing each ray's at its own max_iter-entry block of the output touched a fresh page
         * every ray or few, which made the march slower the finer its step (a 4x max_iter: 1.7x the time) */
        float *scr = lo < hi ? (float *)malloc(2 * MARCH_LANES * max_iter * sizeof(float)) : NULL;
        if (lo < hi && !scr) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
        for (int64_t g0 = lo; scr && g0 < hi; g0 += MARCH_LANES) {
            int W = hi - g0 < MARCH_LANES ? (int)(hi - g0) : MARCH_LANES, alive = 0;
            double tc[MARCH_LANES], tend[MARCH_LANES], frac[MARCH_LANES], oo[MARCH_LANES][3], dd[MARCH_LANES][3];
            int64_t n_l[MARCH_LANES];
            int live[MARCH_LANES];
            for (int l = 0; l < W; l++) { /* each lane writes its ray's samples into its scratch row */
                int64_t r = g0 + l;
                tc[l] = t_in[r];
                tend[l] = t_out[r];
                frac[l] = u[r];
                n_l[l] = 0;
                live[l] = tc[l] < tend[l];
                alive += live[l];
                for (int a = 0; a < 3; a++) { oo[l][a] = o[3 * r + a]; dd[l][a] = d[3 * r + a]; }
            }
            for (int l = W; l < MARCH_LANES; l++) { /* idle lanes: finite values, never live */
                tc[l] = 0.0; tend[l] = 0.0; frac[l] = 1.0; n_l[l] = 0; live[l] = 0;
                for (int a = 0; a < 3; a++) { oo[l][a] = 0.0; dd[l][a] = 1.0; }
            }
            /* Each stage runs over all lanes (a dead lane computes on its last values and is masked at the
             * end): the lanes' dependency chains (divisions, square roots) are independent within a stage, so
             * the CPU overlaps them; the arithmetic of each lane is the one-lane loop's, in the same order. */
            for (int64_t it = 0; it < max_iter && alive; it++) {
                double h[MARCH_LANES], dt[MARCH_LANES];
                for (int l = 0; l < MARCH_LANES; l++) { /* the predictor: the speed at the interval's start */
                    double x[3];
                    h[l] = frac[l] * step;
                    for (int a = 0; a < 3; a++) x[a] = oo[l][a] + tc[l] * dd[l][a];
                    dt[l] = h[l] / speed_d(x, dd[l], c1, kinv);
                }
                for (int l = 0; l < MARCH_LANES; l++) { /* the corrector: the speed at its middle */
                    double tm = tc[l] + 0.5 * dt[l], x[3];
                    for (int a = 0; a < 3; a++) x[a] = oo[l][a] + tm * dd[l][a];
                    dt[l] = h[l] / speed_d(x, dd[l], c1, kinv);
                }
                for (int l = 0; l < MARCH_LANES; l++) { /* the interval, a sample if its middle is occupied */
                    if (!live[l]) continue;
                    double t1 = tc[l] + dt[l] < tend[l] ? tc[l] + dt[l] : tend[l];
                    double mid = 0.5 * (tc[l] + t1), x[3];
                    int64_t ijk[3];
                    for (int a = 0; a < 3; a++) x[a] = oo[l][a] + mid * dd[l][a];
                    if (midpoint_cell(x, kinv, half_res, res, ijk) && occ[(ijk[0] * res + ijk[1]) * res + ijk[2]]) {
                        int64_t p = 2 * (l * max_iter + n_l[l]++);
                        scr[p] = (float)tc[l];
                        scr[p + 1] = (float)t1;
                    }
                    if (!(t1 < tend[l])) { live[l] = 0; alive--; }
                    tc[l] = t1;
                    frac[l] = 1.0;
                }
            }
            for (int l = 0; l < W; l++) { /* the lanes' samples, packed in ray order */
                const float *src = scr + 2 * l * max_iter;
                for (int64_t j = 0; j < n_l[l]; j++) {
                    ts[at + j] = src[2 * j];
                    te[at + j] = src[2 * j + 1];
                    ri[at + j] = g0 + l;
                }
                at += n_l[l];
            }
        }
        free(scr);
        from[t] = lo * max_iter;
        counts[t] = at - from[t];
    }
    if (failed) return -1;
    return pack_blocks(ts, te, ri, from, counts, used);
}

/* Ray marching in the unit cube (OccupancySampler.march without contraction): candidate j < counts[r]
 * of ray r sits at t = t_in[r] + (j + u[r]) · step, x = o + t · d; it is a sample when the cell
 * floor((x + 1) · res / 2) (clamped to the grid) is occupied, with the interval
 * [max(t − step/2, t_in), min(t + step/2, t_out)]. float32 throughout, each operation in the PyTorch
 * form's order, so the samples are the same bit for bit. Samples go out ray after ray from the
 * offset starts[r] (the candidates of the rays before r: the buffers hold Σ counts entries), then are
 * moved together. Returns the number of samples, or −1 (before writing anything) if a count is negative or
 * the offsets are not the counts' exclusive prefix sums. */
int64_t vqad_march_uniform(const float *o, const float *d, const float *t_in, const float *t_out, const float *u,
                           const int64_t *counts, const int64_t *starts, int64_t R, const uint8_t *occ, int level,
                           float step, float *ts, float *te, int64_t *ri, int nthreads) {
    const int64_t res = (int64_t)1 << level;
    const float half_res = 0.5f * (float)res, hs = 0.5f * step;
    int64_t kept[257], from[257];
    for (int64_t r = 0; r < R; r++) /* before any write: the offsets and the capacity come from the counts */
        if (counts[r] < 0 || starts[r] != (r ? starts[r - 1] + counts[r - 1] : 0)) return -1;
    nthreads = team_size(nthreads);
    int used = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads)
#endif
    {
        int T = thread_count(), t = thread_id();
#ifdef _OPENMP
#pragma omp single
#endif
        used = T;
        int64_t lo = R * t / T, hi = R * (t + 1) / T, at = lo < R ? starts[lo] : 0, first = at;
        for (int64_t r = lo; r < hi; r++) {
            const float ox = o[3 * r], oy = o[3 * r + 1], oz = o[3 * r + 2];
            const float dx = d[3 * r], dy = d[3 * r + 1], dz = d[3 * r + 2], a = t_in[r], b = t_out[r], ur = u[r];
            for (int64_t j = 0; j < counts[r]; j++) {
                float tj = a + ((float)j + ur) * step;
                float x[3] = {ox + tj * dx, oy + tj * dy, oz + tj * dz};
                int64_t ijk[3];
                for (int c = 0; c < 3; c++) { /* floor by truncation: y < 1 (and NaN) is cell 0, as the clamp gives */
                    float y = (x[c] + 1.0f) * half_res;
                    ijk[c] = y >= 1.0f ? (y >= (float)res ? res - 1 : (int64_t)y) : 0;
                }
                if (occ[(ijk[0] * res + ijk[1]) * res + ijk[2]]) {
                    float s0 = tj - hs, s1 = tj + hs;
                    ts[at] = s0 > a ? s0 : a;
                    te[at] = s1 < b ? s1 : b;
                    ri[at] = r;
                    at++;
                }
            }
        }
        from[t] = first;
        kept[t] = at - first;
    }
    return pack_blocks(ts, te, ri, from, kept, used);
}
