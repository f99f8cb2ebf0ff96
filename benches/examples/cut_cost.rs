//! What a sender's first pass over a file costs (`sund file send` learns the chunks before it
//! uploads them): reading alone, cutting with fastcdc's own `StreamCDC` (which the chunker
//! used until 2026-12-07, a copy per chunk), cutting with Sund's block chunker, cutting and
//! hashing on one thread, cutting and sealing on one thread (how the pass ran until
//! 2026-12-07), and the two-thread pass the CLI runs now (`sund_node::cutting::cut_and_hash`). The file should be in the page cache
//! (read it once first), as a file someone sends usually is.
//!
//! ```text
//! cargo run --release -p sund-benches --example cut_cost FILE
//! ```

use std::io::Read;
use std::time::Instant;

use sund_model::files::{
    stream_chunker, ContentHash, FileName, FileSecret, ManifestBuilder, CHUNK_BYTES_AVG,
    CHUNK_BYTES_MAX, CHUNK_BYTES_MIN,
};
use sund_model::identity::DeviceKey;
use sund_model::ids::ConversationId;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: cut_cost FILE");
        std::process::exit(2)
    };
    let path = std::path::PathBuf::from(path);
    let secret = FileSecret::for_conversation(
        &DeviceKey::from_seed([7; 32]),
        ConversationId::from_name("cut cost"),
    );
    let name = FileName::new("bench").expect("a plain name");
    let open = || std::io::BufReader::new(std::fs::File::open(&path).expect("the file opens"));
    for pass in [
        "read",
        "cut (StreamCDC)",
        "cut",
        "cut+hash",
        "cut+seal",
        "cut_and_hash",
    ] {
        let started = Instant::now();
        let mut bytes = 0u64;
        match pass {
            "read" => {
                let mut file = open();
                let mut buffer = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buffer).expect("the file reads");
                    if n == 0 {
                        break;
                    }
                    bytes += n as u64;
                }
            }
            "cut (StreamCDC)" => {
                let chunks = fastcdc::v2020::StreamCDC::with_level_and_seed(
                    open(),
                    CHUNK_BYTES_MIN,
                    CHUNK_BYTES_AVG,
                    CHUNK_BYTES_MAX,
                    fastcdc::v2020::Normalization::Level1,
                    secret.gear_seed(),
                );
                for chunk in chunks {
                    bytes += chunk.expect("the file reads").length as u64;
                }
            }
            "cut_and_hash" => {
                let manifest =
                    sund_node::cutting::cut_and_hash(&path, name.clone(), secret.clone(), |_| {})
                        .expect("the file cuts");
                bytes = manifest.size;
            }
            _ => {
                let mut builder = ManifestBuilder::new(name.clone(), secret.clone());
                let file = std::fs::File::open(&path).expect("the file opens");
                for chunk in stream_chunker(&secret, file) {
                    let chunk = chunk.expect("the file reads");
                    bytes += chunk.len() as u64;
                    match pass {
                        "cut+hash" => {
                            std::hint::black_box(ContentHash::of(&chunk));
                        }
                        "cut+seal" => {
                            std::hint::black_box(builder.push(&chunk).expect("a chunk"));
                        }
                        _ => {}
                    }
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{pass}: {bytes} bytes in {secs:.2} s ({:.0} MiB/s)",
            bytes as f64 / secs / 1048576.0
        );
    }
}
