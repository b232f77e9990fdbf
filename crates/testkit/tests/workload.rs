//! The verifying workload against in-process NBD servers: checkpoints taken with a
//! freeze/thaw that cuts each volume at its freeze pass the checker; a marker placed at
//! thaw, with volumes thawed one after another, is caught; images with a write removed, a
//! required write missing, a late write present or a corrupted byte fail, each with the
//! violation it is.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use tandem_nbd::{BlockDevice, Exports, IoFuture, MemDevice, NbdClient, NbdServer};
use tandem_testkit::workload::{
    BLOCK_SIZE, CheckError, CutWindow, DeviceImage, FileImage, History, ImageReader, Mark, Spread,
    VolumeTarget, Workload, WorkloadConfig, WriteId, WriterId, check_final, check_image,
    encode_block,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

const REGION_BLOCKS: u64 = 64;
/// Region, two spare blocks and a partial block that must all stay zero.
const VOLUME_SIZE: usize = (REGION_BLOCKS as usize + 2) * BLOCK_SIZE as usize + 512;
const VOLUMES: usize = 3;
const WRITERS: u32 = 6;

/// A volume that freezes like a protected VRA: from `freeze` on, it applies writes but
/// holds back their acknowledgements until it thaws. The image of the checkpoint is cut
/// at the freeze (`freeze`'s return: the marker goes before every write that arrived
/// while frozen), or, as a VRA that appends the marker at thaw would, at the thaw
/// (`thaw_late`'s return).
#[derive(Debug)]
struct GatedDevice {
    data: Mutex<Vec<u8>>,
    frozen: watch::Sender<bool>,
}

impl GatedDevice {
    fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            frozen: watch::Sender::new(false),
        }
    }

    fn data(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Freezes and returns the image at the marker: every write applied so far.
    fn freeze(&self) -> Vec<u8> {
        let data = self.data();
        self.frozen.send_replace(true);
        data.clone()
    }

    fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Thaws and returns the image at a marker placed now, after the writes that arrived
    /// while frozen.
    fn thaw_late(&self) -> Vec<u8> {
        let data = self.data();
        self.frozen.send_replace(false);
        data.clone()
    }

    fn contents(&self) -> Vec<u8> {
        self.data().clone()
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.data().len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        let start = offset as usize;
        let bytes = Bytes::copy_from_slice(&self.data()[start..start + len as usize]);
        Box::pin(std::future::ready(Ok(bytes)))
    }

    fn write(&self, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let held = {
                let mut image = self.data();
                let start = offset as usize;
                image[start..start + data.len()].copy_from_slice(&data);
                // Read under the data lock, so a write is either in the freeze's image or
                // held until the thaw.
                *self.frozen.borrow()
            };
            if held {
                let mut frozen = self.frozen.subscribe();
                let _ = frozen.wait_for(|frozen| !*frozen).await;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn trim(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.data()[offset as usize..(offset + len) as usize].fill(0);
        Box::pin(std::future::ready(Ok(())))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> IoFuture<'_, ()> {
        self.trim(offset, len)
    }
}

struct Server {
    addr: SocketAddr,
    exports: Exports,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), tandem_nbd::NbdError>>,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Exports::new();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(NbdServer::new(exports.clone()).serve(listener, shutdown.clone()));
        Self {
            addr,
            exports,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Three volumes on two servers (volumes 0 and 1 on the first, 2 on the second).
struct Site {
    servers: Vec<Server>,
    devices: Vec<Arc<GatedDevice>>,
    targets: Vec<VolumeTarget>,
}

impl Site {
    async fn start() -> Self {
        let servers = vec![Server::start().await, Server::start().await];
        let mut devices = Vec::new();
        let mut targets = Vec::new();
        for volume in 0..VOLUMES {
            let server = &servers[usize::from(volume == 2)];
            let device = Arc::new(GatedDevice::new(VOLUME_SIZE));
            let name = format!("vol{volume}");
            server
                .exports
                .insert(name.clone(), Arc::clone(&device) as Arc<dyn BlockDevice>)
                .unwrap();
            devices.push(device);
            targets.push(VolumeTarget::new(server.addr, name));
        }
        Self {
            servers,
            devices,
            targets,
        }
    }

    fn config(&self, spread: Spread) -> WorkloadConfig {
        let mut config = WorkloadConfig::new(self.targets.clone());
        config.writers = WRITERS;
        config.spread = spread;
        config.region_blocks = Some(REGION_BLOCKS);
        config
    }

    fn contents(&self) -> Vec<Vec<u8>> {
        self.devices
            .iter()
            .map(|device| device.contents())
            .collect()
    }

    async fn stop(self) {
        for server in self.servers {
            server.stop().await;
        }
    }
}

fn refs<T: ImageReader>(images: &[T]) -> Vec<&dyn ImageReader> {
    images
        .iter()
        .map(|image| image as &dyn ImageReader)
        .collect()
}

/// A finished run: its history, a mark taken mid-run with writes both before and after
/// it, and the final images.
struct Run {
    history: History,
    mid: Mark,
    images: Vec<Vec<u8>>,
}

async fn run() -> Run {
    let site = Site::start().await;
    let workload = Workload::start(site.config(Spread::AcrossVolumes))
        .await
        .unwrap();
    println!("workload seed {:#x}", workload.seed());
    workload.wait_acked(1500).await.unwrap();
    let mid = workload.mark();
    // Enough acknowledgements after the mark that some writer issued a write after it.
    workload
        .wait_acked(workload.acked() + 1500 + 2 * u64::from(WRITERS))
        .await
        .unwrap();
    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    assert_eq!(history.acked_writes(), history.total_writes());
    let images = site.contents();
    site.stop().await;
    Run {
        history,
        mid,
        images,
    }
}

type Checkpoints = Vec<(CutWindow, Vec<Vec<u8>>)>;

/// Runs the workload for about a second with eight checkpoints, checks them all and
/// returns them with the history (the site is left running, the workload stopped).
async fn checkpoints(spread: Spread) -> (Site, History, Checkpoints) {
    let site = Site::start().await;
    let workload = Workload::start(site.config(spread)).await.unwrap();
    println!("workload seed {:#x}, {spread:?}", workload.seed());
    let mut checkpoints = Vec::new();
    for round in 0..8 {
        workload.wait_acked(workload.acked() + 200).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Freeze every volume in turn (as the VRAs of a VPG answer one by one), hold the
        // freeze while writes pile up, then thaw them in turn.
        let acked_before = workload.mark();
        let mut images = Vec::new();
        for device in &site.devices {
            images.push(device.freeze());
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(5 + round)).await;
        for device in site.devices.iter().rev() {
            device.thaw();
            tokio::task::yield_now().await;
        }
        let issued_after = workload.mark();
        checkpoints.push((CutWindow::new(acked_before, issued_after), images));
    }
    // Check one checkpoint while the workload still runs, with a history copy.
    let (window, images) = &checkpoints[0];
    let report = check_image(&workload.history(), window, &refs(images))
        .await
        .unwrap();
    println!("checkpoint 0 (running): {report}");

    let history = workload.stop().await;
    assert!(history.failures().is_empty(), "{:?}", history.failures());
    assert_eq!(history.acked_writes(), history.total_writes());
    for (index, (window, images)) in checkpoints.iter().enumerate() {
        let report = check_image(&history, window, &refs(images))
            .await
            .unwrap_or_else(|err| panic!("checkpoint {index}: {err}"));
        println!("checkpoint {index}: {report}");
        assert!(report.writes_included >= report.required.iter().sum::<u64>());
        for (volume, check) in report.volumes.iter().enumerate() {
            assert_eq!(check.expected, check.actual);
            assert_eq!(
                check.actual,
                blake3::hash(&images[volume]),
                "the reported hash is that of the image"
            );
        }
        // The same checkpoint against a later window fails: writes acknowledged after
        // the thaw are missing from it.
        if index + 1 < checkpoints.len() {
            let later = CutWindow::exact(checkpoints[index + 1].0.acked_before);
            let err = check_image(&history, &later, &refs(images))
                .await
                .unwrap_err();
            assert!(
                matches!(err, CheckError::MissingAcknowledged { .. }),
                "{err}"
            );
        }
    }
    (site, history, checkpoints)
}

#[tokio::test]
async fn workload_checkpoints_of_writers_on_one_volume_each_pass() {
    let (site, history, _) = checkpoints(Spread::OneVolume).await;
    let devices: Vec<DeviceImage> = site
        .devices
        .iter()
        .map(|device| DeviceImage(Arc::clone(device) as Arc<dyn BlockDevice>))
        .collect();
    check_final(&history, &refs(&devices)).await.unwrap();
    site.stop().await;
}

#[tokio::test]
async fn workload_checkpoints_are_closed_under_happened_before() {
    let (site, history, checkpoints) = checkpoints(Spread::AcrossVolumes).await;

    // A checkpoint served read-only over NBD, as a point-in-time export is.
    let (window, images) = &checkpoints[checkpoints.len() / 2];
    let server = &site.servers[0];
    let mut clients = Vec::new();
    for (volume, image) in images.iter().enumerate() {
        let name = format!("cp-vol{volume}");
        server
            .exports
            .insert(
                name.clone(),
                Arc::new(MemDevice::from_vec(image.clone()).read_only()),
            )
            .unwrap();
        clients.push(NbdClient::connect(server.addr, &name).await.unwrap());
    }
    let report = check_image(&history, window, &refs(&clients))
        .await
        .unwrap();
    println!("checkpoint over nbd: {report}");
    for client in clients {
        client.disconnect().await.unwrap();
    }

    // After the stop, the live volumes hold every write: over NBD, in-process, in files.
    let mut clients = Vec::new();
    for target in &site.targets {
        clients.push(
            NbdClient::connect_to(&target.addr, &target.export)
                .await
                .unwrap(),
        );
    }
    let report = check_final(&history, &refs(&clients)).await.unwrap();
    println!("final over nbd: {report}");
    assert_eq!(report.cut, history.latest());
    assert_eq!(report.max_lag, 0);
    for client in clients {
        client.disconnect().await.unwrap();
    }
    let devices: Vec<DeviceImage> = site
        .devices
        .iter()
        .map(|device| DeviceImage(Arc::clone(device) as Arc<dyn BlockDevice>))
        .collect();
    check_final(&history, &refs(&devices)).await.unwrap();

    let dir = std::env::temp_dir().join(format!(
        "tandem-workload-{}-{:x}",
        std::process::id(),
        history.seed()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (volume, contents) in site.contents().iter().enumerate() {
        let path = dir.join(format!("vol{volume}.img"));
        std::fs::write(&path, contents).unwrap();
        files.push(FileImage::open(&path).unwrap());
    }
    let result = check_final(&history, &refs(&files)).await;
    std::fs::remove_dir_all(&dir).unwrap();
    result.unwrap();
    site.stop().await;
}

#[tokio::test]
async fn workload_cuts_at_a_mark_pass_its_window() {
    let Run { history, mid, .. } = run().await;
    let window = CutWindow::exact(mid);
    // Everything acknowledged by the mark, and everything issued by it (the writes in
    // flight at the mark included), are both consistent cuts the window allows.
    for cut in [history.acked_by(mid), history.issued_by(mid)] {
        let images = history.images_at(&cut);
        let report = check_image(&history, &window, &refs(&images))
            .await
            .unwrap();
        assert_eq!(report.cut, cut);
    }
    // An empty image is the cut of nothing: allowed by a window that requires nothing.
    let nothing = vec![0; history.writer_count()];
    let images = history.images_at(&nothing);
    let report = check_image(&history, &CutWindow::exact(Mark::ORIGIN), &refs(&images))
        .await
        .unwrap();
    assert_eq!(report.writes_included, 0);
    let err = check_image(&history, &CutWindow::new(mid, Mark::ORIGIN), &refs(&images))
        .await
        .unwrap_err();
    assert!(matches!(err, CheckError::InvalidWindow { .. }), "{err}");
}

/// (a) A write of another writer is missing while a write issued after it was
/// acknowledged is present.
#[tokio::test]
async fn workload_a_missing_dependency_of_another_writer_fails() {
    let Run { history, .. } = run().await;
    let full = history.latest();
    let visible = history.visible_writes(&full);
    // For some writer j, the newest of its writes that a visible write of another writer
    // depends on.
    let (writer, seq) = (0..history.writer_count())
        .filter_map(|j| {
            let needed = visible
                .iter()
                .filter(|write| write.id.writer.0 as usize != j)
                .map(|write| history.deps(write.id).unwrap()[j])
                .max()?;
            (needed > 0).then_some((WriterId(j as u32), needed))
        })
        .next()
        .expect("some visible write depends on another writer");
    let mut cut = full.clone();
    cut[writer.0 as usize] = seq - 1;
    let images = history.images_at(&cut);
    let window = CutWindow::new(Mark::ORIGIN, history.end());
    let err = check_image(&history, &window, &refs(&images))
        .await
        .unwrap_err();
    println!("{err}");
    let CheckError::MissingDependency {
        dependent,
        dependent_issued_at,
        missing,
        missing_acked_at,
        ..
    } = err
    else {
        panic!("expected a missing dependency, got {err}");
    };
    assert_eq!(missing, WriteId::new(writer, seq));
    assert_ne!(dependent.writer, writer);
    assert!(dependent_issued_at > missing_acked_at);
    assert_eq!(
        history.write(missing).unwrap().acked_at,
        Some(missing_acked_at)
    );
    assert_eq!(
        history.write(dependent).unwrap().issued_at,
        dependent_issued_at
    );
}

/// (a) One write removed (its block rolled back) while a later write of its writer is
/// present.
#[tokio::test]
async fn workload_one_write_removed_fails_happened_before() {
    let Run {
        history, images, ..
    } = run().await;
    let full = history.latest();
    // A visible write that is not its writer's last, and its block's previous version.
    let target = history
        .visible_writes(&full)
        .into_iter()
        .find(|write| write.id.seq < full[write.id.writer.0 as usize])
        .expect("a visible write that is not its writer's last");
    let previous = history.writes(target.id.writer)[..(target.id.seq - 1) as usize]
        .iter()
        .rposition(|record| (record.volume, record.block) == (target.volume, target.block))
        .map(|index| WriteId::new(target.id.writer, index as u64 + 1));
    let mut images = images;
    let start = (target.block * BLOCK_SIZE) as usize;
    let block = &mut images[target.volume as usize][start..start + BLOCK_SIZE as usize];
    match previous {
        Some(previous) => block.copy_from_slice(&history.write_bytes(previous).unwrap()),
        None => block.fill(0),
    }
    let window = CutWindow::new(Mark::ORIGIN, history.end());
    let err = check_image(&history, &window, &refs(&images))
        .await
        .unwrap_err();
    println!("{err}");
    let CheckError::MissingDependency {
        dependent,
        missing,
        volume,
        block,
        ..
    } = err
    else {
        panic!("expected a missing dependency, got {err}");
    };
    assert_eq!(missing, target.id);
    assert_eq!((volume, block), (target.volume, target.block));
    assert_eq!(
        dependent,
        WriteId::new(target.id.writer, full[target.id.writer.0 as usize])
    );
}

/// (b) A write acknowledged before the window opened is missing.
#[tokio::test]
async fn workload_a_missing_acknowledged_write_fails() {
    let Run { history, mid, .. } = run().await;
    let required = history.acked_by(mid);
    let writer = required
        .iter()
        .position(|&count| count > 0)
        .expect("writes acknowledged by the mark");
    let mut cut = required.clone();
    cut[writer] -= 1;
    let images = history.images_at(&cut);
    let err = check_image(&history, &CutWindow::exact(mid), &refs(&images))
        .await
        .unwrap_err();
    println!("{err}");
    let CheckError::MissingAcknowledged {
        write,
        acked_at,
        acked_before,
        ..
    } = err
    else {
        panic!("expected a missing acknowledged write, got {err}");
    };
    assert_eq!(
        write,
        WriteId::new(WriterId(writer as u32), required[writer])
    );
    assert!(acked_at <= acked_before);
    assert_eq!(acked_before, mid);
}

/// (c) A write issued after the window closed is present.
#[tokio::test]
async fn workload_a_write_issued_after_the_window_fails() {
    let Run {
        history,
        mid,
        images,
    } = run().await;
    // The final image is fine for a window that closes at the end...
    check_image(
        &history,
        &CutWindow::new(mid, history.end()),
        &refs(&images),
    )
    .await
    .unwrap();
    // ...and not for one that closed mid-run.
    let err = check_image(&history, &CutWindow::exact(mid), &refs(&images))
        .await
        .unwrap_err();
    println!("{err}");
    let CheckError::IssuedAfterWindow {
        write,
        issued_at,
        issued_after,
        ..
    } = err
    else {
        panic!("expected a write issued after the window, got {err}");
    };
    assert!(issued_at > issued_after);
    assert_eq!(history.write(write).unwrap().issued_at, issued_at);
}

/// Damage done to one image.
type Damage = Box<dyn Fn(&mut Vec<u8>)>;

/// (d) A corrupted byte, in a written block, a header, outside the region, or a block of
/// another run.
#[tokio::test]
async fn workload_corruption_fails() {
    let Run {
        history, images, ..
    } = run().await;
    check_final(&history, &refs(&images)).await.unwrap();
    let written = history.visible_writes(&history.latest())[0];
    let start = written.block * BLOCK_SIZE;
    let seed = history.seed();
    let cases: Vec<(&str, Damage)> = vec![
        (
            "payload byte",
            Box::new(move |image| image[(start + 1000) as usize] ^= 1),
        ),
        (
            "header byte",
            Box::new(move |image| image[(start + 24) as usize] ^= 1),
        ),
        (
            "outside the region",
            Box::new(|image| {
                let at = image.len() - 3;
                image[at] = 0x5a;
            }),
        ),
        (
            "another run's block",
            Box::new(move |image| {
                let other = encode_block(
                    seed ^ 1,
                    written.volume,
                    written.id.writer,
                    written.id.seq,
                    written.block,
                );
                image[start as usize..(start + BLOCK_SIZE) as usize].copy_from_slice(&other);
            }),
        ),
    ];
    for (name, damage) in cases {
        let mut damaged = images.clone();
        damage(&mut damaged[written.volume as usize]);
        let err = check_final(&history, &refs(&damaged)).await.unwrap_err();
        println!("{name}: {err}");
        match (name, &err) {
            (
                "payload byte" | "header byte" | "another run's block",
                CheckError::Corrupt { volume, block, .. },
            ) => assert_eq!((*volume, *block), (written.volume, written.block)),
            ("outside the region", CheckError::NotZero { volume, value, .. }) => {
                assert_eq!((*volume, *value), (written.volume, 0x5a));
            }
            _ => panic!("{name}: unexpected {err}"),
        }
    }
    // A truncated image is refused before anything else.
    let mut short = images.clone();
    short[0].truncate(VOLUME_SIZE - 1);
    let err = check_final(&history, &refs(&short)).await.unwrap_err();
    assert!(matches!(err, CheckError::SizeMismatch { .. }), "{err}");
}

/// A VRA that appends the marker at thaw and lets the writes that arrived while it was
/// frozen in before it breaks write-order fidelity when the volumes thaw one after
/// another: a writer sees an acknowledgement from a thawed volume, then writes to a volume
/// still frozen, and that write lands before the later marker while the one it depends on
/// is after the earlier one. Rounds repeat until a writer did exactly that (the log shows
/// it), and then the checker must catch it.
#[tokio::test]
async fn workload_catches_a_marker_placed_at_thaw() {
    let site = Site::start().await;
    let workload = Workload::start(site.config(Spread::AcrossVolumes))
        .await
        .unwrap();
    println!("workload seed {:#x}", workload.seed());
    for round in 0.. {
        assert!(round < 100, "no round had a write depend across the thaws");
        workload.wait_acked(workload.acked() + 100).await.unwrap();
        let acked_before = workload.mark();
        for device in &site.devices {
            device.freeze();
        }
        let first = site.devices[0].thaw_late();
        let thawed = workload.mark();
        let witness = loop {
            let history = workload.history();
            if let Some(witness) = write_across_thaws(&history, thawed, &site) {
                break Some(witness);
            }
            // Every writer waits on a frozen volume: nothing more can happen.
            let held = (0..history.writer_count()).all(|writer| {
                history
                    .writes(WriterId(writer as u32))
                    .last()
                    .is_some_and(|last| last.acked_at.is_none() && last.volume != 0)
            });
            if held {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let mut images = vec![first];
        images.extend(site.devices[1..].iter().map(|device| device.thaw_late()));
        let issued_after = workload.mark();
        let Some((dependent, missing)) = witness else {
            continue;
        };
        println!("round {round}: {dependent} landed before its marker, {missing} after");
        let history = workload.history();
        let window = CutWindow::new(acked_before, issued_after);
        let err = check_image(&history, &window, &refs(&images))
            .await
            .unwrap_err();
        println!("{err}");
        assert!(matches!(err, CheckError::MissingDependency { .. }), "{err}");
        break;
    }
    workload.stop().await;
    site.stop().await;
}

/// A write to volume 0 issued after `thawed` and acknowledged, and a later write that
/// depends on it and has reached a still frozen volume: (dependent, missing).
fn write_across_thaws(history: &History, thawed: Mark, site: &Site) -> Option<(WriteId, WriteId)> {
    let acked_on_first: Vec<(WriteId, Mark)> = (0..history.writer_count())
        .flat_map(|writer| {
            let writer = WriterId(writer as u32);
            history
                .writes(writer)
                .iter()
                .zip(1u64..)
                .filter(|(record, _)| record.volume == 0 && record.issued_at > thawed)
                .filter_map(move |(record, seq)| {
                    Some((WriteId::new(writer, seq), record.acked_at?))
                })
        })
        .collect();
    for writer in (0..history.writer_count()).map(|writer| WriterId(writer as u32)) {
        for (record, seq) in history.writes(writer).iter().zip(1u64..) {
            if record.volume == 0 {
                continue;
            }
            let Some(&(missing, _)) = acked_on_first
                .iter()
                .find(|(_, acked_at)| *acked_at < record.issued_at)
            else {
                continue;
            };
            let dependent = WriteId::new(writer, seq);
            // It has reached its volume (and is held there: its writer waits for it).
            let start = (record.block * BLOCK_SIZE) as usize;
            let landed = site.devices[record.volume as usize].data()
                [start..start + BLOCK_SIZE as usize]
                == history.write_bytes(dependent)?[..];
            if landed {
                return Some((dependent, missing));
            }
        }
    }
    None
}
