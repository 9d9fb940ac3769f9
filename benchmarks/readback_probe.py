"""How long reading a few words back from the GPU takes, by output size (MLX serves 8 bytes or
less from a host-mapped pool; larger outputs are device memory, copied on first host access)."""
import statistics
import time

import mlx.core as mx

src = "uint32_t i = threadIdx.x; if (i < N) { out[i] = inp[0] + i; }"
k = mx.fast.cuda_kernel(name="probe", input_names=["inp"], output_names=["out"], source=src)
x = mx.array([5], dtype=mx.uint32)
mx.eval(x)
for words in (1, 2, 4, 64):
    ev, rb, ok = [], [], True
    for rep in range(30):
        t0 = time.perf_counter()
        o = k(inputs=[x], template=[("N", words)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
              output_shapes=[(words,)], output_dtypes=[mx.uint32])[0]
        mx.eval(o)
        t1 = time.perf_counter()
        v = o.tolist()
        t2 = time.perf_counter()
        ok &= v == [5 + i for i in range(words)]
        if rep >= 5:
            ev.append(t1 - t0)
            rb.append(t2 - t1)
    print(f"{4 * words:4d} bytes: launch+eval {statistics.median(ev) * 1e3:.3f} ms, "
          f"read-back {statistics.median(rb) * 1e3:.3f} ms, values right: {ok}")
y = mx.ones((1 << 20,))
for words in (1, 2, 4, 64):
    rb = []
    for rep in range(30):
        o = (y[:words] * rep).astype(mx.uint32)
        mx.eval(o)
        t1 = time.perf_counter()
        o.tolist()
        rb.append(time.perf_counter() - t1)
    print(f"{4 * words:4d} bytes from an MLX op: read-back {statistics.median(rb[5:]) * 1e3:.3f} ms")
