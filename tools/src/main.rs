fn main() -> std::process::ExitCode {
    convnets_tools::main_with(std::env::args_os())
}
