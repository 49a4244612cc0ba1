//! Properties of position ids, the allocator and the codec.

use std::collections::HashSet;

use bytes::BytesMut;
use notesync_protocol::pid::compare_levels;
use notesync_protocol::*;
use proptest::prelude::*;

fn level() -> impl Strategy<Value = Level> {
    // Small idents and sites make equal levels and prefixes common.
    prop_oneof![
        (0u32..4, 0u8..4).prop_map(|(i, s)| Level::new(i, s)),
        (any::<u32>(), any::<u8>()).prop_map(|(i, s)| Level::new(i, s)),
        Just(Level::new(u32::MAX, 255)),
        Just(Level::new(0, 0)),
    ]
}

/// A valid id: 1..=6 levels, last site non-zero.
fn pid() -> impl Strategy<Value = Pid> {
    (prop::collection::vec(level(), 0..6), 0u32..4, 1u8..4).prop_map(|(mut l, i, s)| {
        l.push(Level::new(i, s));
        Pid::from_levels(&l)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn key_order_is_the_level_order(a in pid(), b in pid()) {
        let la: Vec<Level> = a.levels().collect();
        let lb: Vec<Level> = b.levels().collect();
        prop_assert_eq!(a.cmp(&b), compare_levels(&la, &lb));
        prop_assert_eq!(a.key().cmp(b.key()), compare_levels(&la, &lb));
        prop_assert_eq!(a == b, la == lb);
    }

    #[test]
    fn allocation_lands_strictly_between(a in pid(), b in pid(), site in 1u8..=255, seed: u64, doc: u128) {
        prop_assume!(a != b);
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let mut alloc = Allocator::new(site, doc, seed).unwrap();
        for (l, r) in [(Some(&lo), Some(&hi)), (None, Some(&lo)), (Some(&hi), None), (None, None)] {
            let p = alloc.between(l, r).unwrap();
            prop_assert!(l.is_none_or(|l| *l < p), "{:?} !< {:?}", l, p);
            prop_assert!(r.is_none_or(|r| p < *r), "{:?} !< {:?}", p, r);
            prop_assert_eq!(p.creator(), site);
        }
    }

    /// Ids from one site never repeat: allocate between random neighbours of
    /// a sequence that keeps every id (tombstones included), interleaved with
    /// ids of another site.
    #[test]
    fn ids_from_one_site_never_repeat(ops in prop::collection::vec((any::<prop::sample::Index>(), any::<bool>()), 1..400), doc: u128, seed: u64) {
        let mut a = Allocator::new(1, doc, seed).unwrap();
        let mut b = Allocator::new(2, doc, seed ^ 1).unwrap();
        let mut seq: Vec<Pid> = Vec::new();
        let mut seen = HashSet::new();
        for (idx, other) in ops {
            let i = idx.index(seq.len() + 1);
            let alloc = if other { &mut b } else { &mut a };
            let p = alloc.between(if i == 0 { None } else { Some(&seq[i - 1]) }, seq.get(i)).unwrap();
            prop_assert!(seen.insert(p.clone()), "repeated id {:?}", p);
            seq.insert(i, p);
        }
        prop_assert!(seq.windows(2).all(|w| w[0] < w[1]));
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z]{1,8}", "\\PC{1,40}", Just("é🎉\u{0}".to_string())]
        .prop_filter("1..=255 bytes", |s| !s.is_empty() && s.len() <= 255)
}

fn atom() -> impl Strategy<Value = Atom> {
    (text(), pid()).prop_map(|(t, p)| Atom::new(t, p).unwrap())
}

fn name() -> impl Strategy<Value = DocName> {
    "[^\n]{0,60}".prop_filter_map("<=255 bytes", |s| DocName::new(s).ok())
}

fn atoms() -> impl Strategy<Value = AtomList> {
    prop::collection::vec(atom(), 0..20).prop_map(|v| v.into_iter().collect())
}

fn pids() -> impl Strategy<Value = PidList> {
    prop::collection::vec(pid(), 0..20).prop_map(|v| {
        let mut b = PidListBuilder::new();
        for p in &v {
            b.push(p).unwrap();
        }
        b.finish()
    })
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        any::<u64>().prop_map(|since| ClientFrame::Synclist { since }),
        (any::<u128>(), any::<u64>()).prop_map(|(doc, since)| ClientFrame::Pull { doc, since }),
        (any::<u128>(), name(), any::<u64>(), atoms(), pids()).prop_map(
            |(doc, name, since, inserts, deletes)| {
                ClientFrame::Upsert(Upsert {
                    doc,
                    name,
                    since,
                    inserts,
                    deletes,
                })
            }
        ),
        (any::<u64>(), any::<u128>())
            .prop_map(|(since, doc)| ClientFrame::SessionStart { since, doc }),
        atom().prop_map(|a| ClientFrame::Insert(SessionInsert::new(a))),
        (any::<u8>(), pid())
            .prop_map(|(site, pid)| ClientFrame::Delete(SessionDelete { site, pid })),
        name().prop_map(ClientFrame::Rename),
        (any::<u128>(), prop::collection::vec(any::<u8>(), 0..=255))
            .prop_map(|(r, t)| ClientFrame::Hello(Hello::new(r, t).unwrap())),
    ]
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        prop::collection::vec((any::<u64>(), any::<u128>()), 0..20).prop_map(|v| {
            ServerFrame::SynclistResponse(
                v.into_iter()
                    .map(|(modified, doc)| SyncEntry { modified, doc })
                    .collect(),
            )
        }),
        (any::<u128>(), name(), atoms(), pids()).prop_map(|(doc, name, inserts, deletes)| {
            ServerFrame::DocResponse(DocResponse {
                doc,
                name,
                inserts,
                deletes,
            })
        }),
        (any::<u128>(), any::<u64>(), any::<u8>()).prop_map(|(doc, sync_time, site)| {
            ServerFrame::DocSync {
                doc,
                sync_time,
                site,
            }
        }),
        atom().prop_map(|a| ServerFrame::Insert(SessionInsert::new(a))),
        (any::<u8>(), pid())
            .prop_map(|(site, pid)| ServerFrame::Delete(SessionDelete { site, pid })),
        name().prop_map(ServerFrame::Rename),
        (any::<u64>(), any::<u8>(), any::<u64>()).prop_map(|(session_id, site, sync_time)| {
            ServerFrame::SessionStarted {
                session_id,
                site,
                sync_time,
            }
        }),
        any::<u64>().prop_map(|count| ServerFrame::SessionAck { count }),
        (any::<u8>(), any::<u64>()).prop_map(|(version, server_time)| ServerFrame::Welcome {
            version,
            server_time
        }),
        (any::<u8>(), "\\PC{0,80}")
            .prop_map(|(c, m)| ServerFrame::Error(ErrorFrame::new(ErrorCode(c), m))),
    ]
}

/// Feeds `wire` to a fresh decoder in pieces cut at `cuts`, collecting every
/// frame; asserts nothing is left over.
fn decode_in_pieces<F: Frame>(wire: &[u8], cuts: &[usize]) -> Vec<F> {
    let mut dec = FrameDecoder::<F>::default();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
    points.push(wire.len());
    points.sort_unstable();
    let mut at = 0;
    for p in points {
        buf.extend_from_slice(&wire[at..p]);
        at = p;
        while let Some(f) = dec.decode(&mut buf).unwrap() {
            out.push(f);
        }
    }
    assert!(buf.is_empty() && !dec.is_mid_frame(), "bytes left over");
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn client_frames_round_trip_split_anywhere(frames in prop::collection::vec(client_frame(), 1..5), cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        prop_assert_eq!(decode_in_pieces::<ClientFrame>(&wire, &cuts), frames);
    }

    #[test]
    fn server_frames_round_trip_split_anywhere(frames in prop::collection::vec(server_frame(), 1..5), cuts in prop::collection::vec(any::<usize>(), 0..12)) {
        let mut wire = BytesMut::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        prop_assert_eq!(decode_in_pieces::<ServerFrame>(&wire, &cuts), frames);
    }

    /// Byte-at-a-time feeding gives the same frames as all at once.
    #[test]
    fn byte_at_a_time(f in client_frame()) {
        let wire = f.to_bytes();
        let cuts: Vec<usize> = (0..wire.len()).collect();
        prop_assert_eq!(decode_in_pieces::<ClientFrame>(&wire, &cuts), vec![f]);
    }

    /// Arbitrary bytes never panic; whatever decodes re-encodes to the same bytes.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let mut buf = BytesMut::from(&bytes[..]);
        let mut dec = FrameDecoder::<ClientFrame>::default();
        let mut consumed = 0;
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            let enc = f.to_bytes();
            prop_assert_eq!(&enc[..], &bytes[consumed..consumed + enc.len()]);
            consumed += enc.len();
        }
    }
}

#[test]
fn counts_are_not_trusted() {
    // An upsert claiming u64::MAX atoms with none present: an error at once,
    // before any bytes of atoms arrive.
    let mut wire = BytesMut::new();
    wire.extend_from_slice(&[2]);
    wire.extend_from_slice(&7u128.to_be_bytes());
    wire.extend_from_slice(b"n\n");
    wire.extend_from_slice(&0u64.to_be_bytes());
    wire.extend_from_slice(&u64::MAX.to_be_bytes());
    let err = FrameDecoder::<ClientFrame>::default()
        .decode(&mut wire)
        .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::TooManyItems {
                count: u64::MAX,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::LIMIT_EXCEEDED);
    assert!(err.to_string().contains("max_items_per_frame"));

    // Under the item limit but over the frame limit: rejected early too.
    let limits = Limits {
        max_frame_bytes: 1024,
        ..Limits::default()
    };
    let mut wire = BytesMut::new();
    wire.extend_from_slice(&[32]);
    wire.extend_from_slice(&1000u64.to_be_bytes());
    let err = FrameDecoder::<ServerFrame>::new(limits)
        .decode(&mut wire)
        .unwrap_err();
    assert!(
        matches!(err, DecodeError::FrameTooLarge { max: 1024 }),
        "{err}"
    );
}

#[test]
fn truncated_stream_is_an_error_at_eof() {
    let wire = ClientFrame::Pull { doc: 1, since: 2 }.to_bytes();
    let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
    let mut dec = FrameDecoder::<ClientFrame>::default();
    assert!(dec.decode(&mut buf).unwrap().is_none());
    let err = dec.decode_eof(&mut buf).unwrap_err();
    assert!(
        matches!(err, DecodeError::Truncated { pending: 24 }),
        "{err}"
    );
}
