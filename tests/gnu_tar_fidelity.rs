//! reimage's extraction must equal GNU tar's, entry for entry, for archives GNU tar made:
//! every file type, owners, modes with setuid/setgid/sticky, nanosecond and zero mtimes,
//! xattrs (security.capability included), hardlink groups, long and non-UTF-8 names.

mod common;

use common::{assert_same, gnu_manifest, rich_image, Env};
use reimage_fixtures::manifest::Ignore;
use reimage_fixtures::{Compression, TarFormat};

fn check(format: TarFormat, compression: Compression) {
    let env = Env::new(&format!("fidelity-{format:?}-{}", compression.name()));
    let image = rich_image(
        &env,
        &format!("rich.{}", compression.name()),
        7,
        format,
        compression,
    );
    env.create_from("c1", &image).ok();
    let expected = gnu_manifest(&env, &image);
    assert_same(&expected, &env.manifest_of("c1"), &Ignore::default());
    assert!(env.leftovers().is_empty());
}

#[test]
fn gnu_format_every_compression() {
    for c in Compression::ALL {
        check(TarFormat::Gnu, c);
    }
}

#[test]
fn posix_format_every_compression() {
    for c in Compression::ALL {
        check(TarFormat::Posix, c);
    }
}
