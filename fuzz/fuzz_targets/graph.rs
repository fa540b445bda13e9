#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| rcptgate::internal::fuzz_graph(data));
