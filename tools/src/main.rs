fn main() -> std::process::ExitCode {
    // More hardware work queues than CUDA's default 8, so that the GPU loader's streams do
    // not queue behind the training stream's kernels (on an H200, `train --loader gpu` went
    // from 0.86 to 0.97 of compute speed; BENCHMARKS.md). CUDA reads it when the process
    // first uses the GPU, so it is set before anything else runs; a value already in the
    // environment wins. Set here, in the binary, while the process has one thread.
    if std::env::var_os("CUDA_DEVICE_MAX_CONNECTIONS").is_none() {
        std::env::set_var("CUDA_DEVICE_MAX_CONNECTIONS", "32");
    }
    convnets_tools::main_with(std::env::args_os())
}
