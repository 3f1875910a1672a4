/* vqad's fused CPU kernels (loaded by vqad/kernels.py through ctypes; see its docstring).
 *
 * Plain C99 and OpenMP, no PyTorch headers: it compiles in well under a second. Every kernel checks
 * the indices it is handed and returns a non-zero code instead of writing out of bounds; Python turns
 * that code into an error. Built with -ffp-contract=off, so a product and a sum are never fused into
 * one rounding: the arithmetic is the PyTorch ops' arithmetic, in the same order where noted.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Bumped whenever a signature changes: the loader refuses a library with another version. */
int vqad_kernels_abi(void) { return 3; }

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
    for (int64_t i = 0; i < U; i++)
        if (rows[i] < 0 || rows[i] >= M || (i > 0 && rows[i] <= rows[i - 1])) return 1;
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
                    int64_t v = (int64_t)floorf((p[a] + 1.0f) * half_res);
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
                int64_t v = (int64_t)floorf((p[a] + 1.0f) * half_res);
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
