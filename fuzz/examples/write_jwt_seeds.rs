//! Writes fuzz/seeds/jwt (one signed token per algorithm) and
//! fuzz/seeds/jwks (the issuer's JWKS) from fuzzkit::jwt's fixed keys.
use fuzzkit::jwt::{jwks, token, SIGNERS};
use std::fs;

fn main() -> std::io::Result<()> {
    let here = env!("CARGO_MANIFEST_DIR");
    fs::create_dir_all(format!("{here}/seeds/jwt"))?;
    fs::create_dir_all(format!("{here}/seeds/jwks"))?;
    for (alg, kid) in SIGNERS {
        fs::write(format!("{here}/seeds/jwt/{}", alg.to_lowercase()), token(alg, kid))?;
    }
    let doc = serde_json::to_string_pretty(&jwks()).map_err(std::io::Error::other)?;
    fs::write(format!("{here}/seeds/jwks/issuer.json"), doc)
}
