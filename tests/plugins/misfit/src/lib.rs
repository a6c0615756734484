//! misfit: exports `xpu:plugin/driver` with a signature that is not the contract's,
//! for the tests of `xpud plugin check` and of the loader's typed export check.

wit_bindgen::generate!({ path: "wit", world: "driver-plugin" });

struct Misfit;

impl exports::xpu::plugin::driver::Guest for Misfit {
    fn init() -> String {
        "not the contract".into()
    }
}

export!(Misfit);
