// The GPU augmentation kernel: crop + antialiased bilinear resize + horizontal flip +
// normalise + cast + layout for a whole batch in one launch, one thread per output pixel.
//
// The filter is the CPU path's (Pillow's BILINEAR, `cpu/augment.rs`): a triangle widened
// by the downscale factor, centre `in0 + (i + 0.5) * scale`, taps `xmin..xmax` clamped to
// the span the filter may read, weights normalised per output pixel. The CPU path runs
// it as two passes rounded to u8 in between; here both axes are summed in one pass in
// float and rounded once, so values differ from the CPU path by at most a level or two.
// Compiled by NVRTC at start-up; no headers, so it builds without a CUDA toolkit.

struct Sample {
    unsigned long long src; // address of pixel (0, 0), channel 0
    long long plane;        // bytes from one channel to the next
    int xstride;            // bytes from one pixel to the next in a row
    int pitch;              // bytes from one row to the next
    int x_lo, x_size;       // source columns the filter may read: x_lo .. x_lo + x_size
    int y_lo, y_size;       // source rows likewise
    float x_in0, x_scale;   // window start relative to x_lo; source pixels per output pixel
    float y_in0, y_scale;
    int flip;
    int pad;
};

struct Taps {
    int first, count;
    float center, inv_scale, norm;
};

// Pillow's precompute_coeffs for one output pixel `o` (already flipped).
__device__ __forceinline__ Taps taps(float in0, float scale, int size, int o) {
    Taps t;
    float filterscale = fmaxf(scale, 1.0f);
    float support = filterscale;
    int ksize = (int)ceilf(support) * 2 + 1;
    t.center = in0 + ((float)o + 0.5f) * scale;
    t.inv_scale = 1.0f / filterscale;
    int lo = max((int)(t.center - support + 0.5f), 0);
    int hi = min((int)(t.center + support + 0.5f), size);
    t.first = lo;
    t.count = max(min(hi - lo, ksize), 0);
    float sum = 0.0f;
    for (int i = 0; i < t.count; ++i) {
        float w = 1.0f - fabsf(((float)(i + lo) - t.center + 0.5f) * t.inv_scale);
        sum += fmaxf(w, 0.0f);
    }
    t.norm = sum > 0.0f ? 1.0f / sum : 1.0f;
    return t;
}

__device__ __forceinline__ float weight(const Taps& t, int i) {
    return fmaxf(1.0f - fabsf(((float)(i + t.first) - t.center + 0.5f) * t.inv_scale), 0.0f);
}

__device__ __forceinline__ unsigned short to_half(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

// bfloat16, rounded to nearest even (as the CPU path's `half::bf16::from_f32`); done by
// hand so that the kernel builds for GPUs without bf16 instructions too.
__device__ __forceinline__ unsigned short to_bf16(float v) {
    unsigned int u = __float_as_uint(v);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// dtype: 0 u8, 1 f16, 2 f32, 3 bf16. layout: 0 NCHW, 1 NHWC.
// scale/offset: per channel, out = round(v) * scale + offset (u8 output ignores them).
extern "C" __global__ void crop_resize_normalize(
    const Sample* __restrict__ samples,
    unsigned long long out,
    int out_w, int out_h,
    int dtype, int layout,
    float s0, float s1, float s2,
    float o0, float o1, float o2)
{
    int ox = blockIdx.x * blockDim.x + threadIdx.x;
    int oy = blockIdx.y * blockDim.y + threadIdx.y;
    int n = blockIdx.z;
    if (ox >= out_w || oy >= out_h) return;
    const Sample s = samples[n];
    int xx = s.flip ? out_w - 1 - ox : ox;
    Taps tx = taps(s.x_in0, s.x_scale, s.x_size, xx);
    Taps ty = taps(s.y_in0, s.y_scale, s.y_size, oy);

    const unsigned char* base = (const unsigned char*)s.src;
    float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f;
    for (int j = 0; j < ty.count; ++j) {
        float wy = weight(ty, j);
        if (wy == 0.0f) continue;
        const unsigned char* row = base + (long long)(s.y_lo + ty.first + j) * s.pitch
                                        + (long long)(s.x_lo + tx.first) * s.xstride;
        float r0 = 0.0f, r1 = 0.0f, r2 = 0.0f;
        for (int i = 0; i < tx.count; ++i) {
            float wx = weight(tx, i);
            const unsigned char* p = row + (long long)i * s.xstride;
            r0 += wx * (float)__ldg(p);
            r1 += wx * (float)__ldg(p + s.plane);
            r2 += wx * (float)__ldg(p + 2 * s.plane);
        }
        acc0 += wy * r0;
        acc1 += wy * r1;
        acc2 += wy * r2;
    }
    float norm = tx.norm * ty.norm;
    // Round to the u8 level first, as the reference (PIL image, then ToTensor) does.
    float v0 = fminf(fmaxf(rintf(acc0 * norm), 0.0f), 255.0f);
    float v1 = fminf(fmaxf(rintf(acc1 * norm), 0.0f), 255.0f);
    float v2 = fminf(fmaxf(rintf(acc2 * norm), 0.0f), 255.0f);

    long long plane = (long long)out_w * out_h;
    long long i0, step;
    if (layout == 0) {
        i0 = (long long)n * 3 * plane + (long long)oy * out_w + ox;
        step = plane;
    } else {
        i0 = (((long long)n * out_h + oy) * out_w + ox) * 3;
        step = 1;
    }
    if (dtype == 0) {
        unsigned char* o = (unsigned char*)out;
        o[i0] = (unsigned char)v0;
        o[i0 + step] = (unsigned char)v1;
        o[i0 + 2 * step] = (unsigned char)v2;
    } else if (dtype == 1) {
        unsigned short* o = (unsigned short*)out;
        o[i0] = to_half(v0 * s0 + o0);
        o[i0 + step] = to_half(v1 * s1 + o1);
        o[i0 + 2 * step] = to_half(v2 * s2 + o2);
    } else if (dtype == 3) {
        unsigned short* o = (unsigned short*)out;
        o[i0] = to_bf16(v0 * s0 + o0);
        o[i0 + step] = to_bf16(v1 * s1 + o1);
        o[i0 + 2 * step] = to_bf16(v2 * s2 + o2);
    } else {
        float* o = (float*)out;
        o[i0] = v0 * s0 + o0;
        o[i0 + step] = v1 * s1 + o1;
        o[i0 + 2 * step] = v2 * s2 + o2;
    }
}
