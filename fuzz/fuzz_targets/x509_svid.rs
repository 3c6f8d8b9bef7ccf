#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| spiffe_broker_fuzz::x509_svid::run(data));
