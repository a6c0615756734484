//! Tasks that analyse video end to end: ffmpeg reads the source, the algorithm's
//! session analyses each sampled frame, events reach an HTTP receiver through the
//! durable queue; statuses follow what the pipeline does.

use std::time::Duration;

use crate::support::*;
use reqwest::Method;
use serde_json::json;

/// A server with the passthrough algorithm running as a CPU service; returns it
/// with the service id.
fn passthrough_service() -> (FileServer, TestServer, String) {
    let platform = FileServer::start();
    let server = TestServer::start(&[]);
    let service = service_of(
        &server,
        &platform,
        "pt",
        &passthrough_package("XPUD-PT-VIDEO"),
    );
    (platform, server, service)
}

fn task(service: &str, url: &str, receiver: &str, policy: &str) -> serde_json::Value {
    json!({
        "algoServiceId": service,
        "restartPolicy": policy,
        "taskInfo": {
            "labels": { "algoCabinName": "cabin", "version": "1.0" },
            "rulesParams": [{
                "areas": [{ "areaid": 7, "areaType": "POLYGON",
                            "points": [{"x": 0.1, "y": 0.1}, {"x": 0.9, "y": 0.1}, {"x": 0.5, "y": 0.9}] }],
                "destinations": { "HTTPDest": { "url": receiver } },
                "eventType": "AREA_SEEN",
                "masks": []
            }],
            "streamOptions": { "videoStreamOptions": { "resolution": "PIXELS_200W", "url": url } }
        }
    })
}

fn create(server: &TestServer, body: serde_json::Value) -> String {
    let (status, created) = server.post("/CAP/AlgoTasks", body);
    assert_eq!(status, 200, "{created}");
    created["data"]["createdStreams"][0]["taskInfo"]["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn detail(server: &TestServer, id: &str) -> serde_json::Value {
    server.get(&format!("/CAP/AlgoTasks/{id}")).1["data"].clone()
}

/// Waits up to `secs` for task `id` to read `wanted`; fails with its detail.
fn reaches(server: &TestServer, id: &str, wanted: &str, secs: u64) {
    assert!(
        wait_for(Duration::from_secs(secs), || status(server, id) == wanted),
        "{}",
        detail(server, id)
    );
}

fn status(server: &TestServer, id: &str) -> String {
    detail(server, id)["taskInfo"]["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A two-second file at 5 fps: ten frames analysed, ten events delivered in order,
/// on the stream's timeline, then FINISHED (NEVER).
#[test]
fn a_file_task_analyses_every_sampled_frame_and_delivers_its_events() {
    let (_platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    let video = test_video(server.data.path(), "two-seconds.mp4", 2, "320x240");
    let id = create(
        &server,
        task(
            &service,
            &format!("file://{}", video.display()),
            &receiver.url,
            "NEVER",
        ),
    );
    reaches(&server, &id, "FINISHED", 30);
    assert!(wait_for(Duration::from_secs(10), || receiver
        .events()
        .len()
        == 10));
    let events = receiver.events();
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["timestamp"].as_u64().unwrap())
        .collect();
    assert_eq!(times, (0..10).map(|i| i * 200).collect::<Vec<u64>>());
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10, "eventIds are unique");
    let first = &events[0];
    assert_eq!(first["taskId"], id.as_str());
    assert_eq!(first["algoServiceId"], service.as_str());
    assert_eq!(first["algoId"], "pt-algo");
    assert_eq!(first["eventType"], "FRAME_SEEN");
    assert_eq!(first["areaId"], 7);
    assert_eq!(first["areaType"], "POLYGON");
    // The frame the plugin saw was the task's resolution.
    assert_eq!(first["attributes"]["width"], 1920);
    assert_eq!(first["attributes"]["height"], 1080);

    let progress = &detail(&server, &id)["taskInfo"]["progress"];
    assert_eq!(progress["eventsDelivered"], 10, "{progress}");
    assert_eq!(progress["eventsQueued"], 0, "{progress}");
}

/// The same over HTTP: a file served by a web server is read to its end.
#[test]
fn an_http_source_is_read_like_a_file() {
    let (platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    let video = test_video(server.data.path(), "served.mp4", 2, "320x240");
    let (url, _) = platform.publish("served.mp4", &std::fs::read(video).unwrap());
    let id = create(&server, task(&service, &url, &receiver.url, "NEVER"));
    reaches(&server, &id, "FINISHED", 30);
    assert!(wait_for(Duration::from_secs(10), || receiver
        .events()
        .len()
        == 10));
}

/// A source that cannot be read ends in ERROR with ffmpeg's reason under NEVER,
/// and is retried, saying so, under ALWAYS. Unsupported schemes are refused.
#[test]
fn sources_that_fail_say_why() {
    let (_platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    let missing = create(
        &server,
        task(
            &service,
            "file:///nowhere/missing.mp4",
            &receiver.url,
            "NEVER",
        ),
    );
    assert!(wait_for(Duration::from_secs(20), || status(
        &server, &missing
    ) == "ERROR"));
    let why = detail(&server, &missing)["taskInfo"]["statusDesc"].to_string();
    assert!(why.contains("No such file"), "{why}");

    let refused = create(
        &server,
        task(
            &service,
            "http://127.0.0.1:9/nothing.mp4",
            &receiver.url,
            "ALWAYS",
        ),
    );
    assert!(wait_for(Duration::from_secs(20), || detail(
        &server, &refused
    )["taskInfo"]["statusDesc"]
        .as_str()
        .unwrap()
        .starts_with("reconnecting (attempt ")));
    assert_eq!(status(&server, &refused), "PENDING");

    let (status_code, body) = server.post(
        "/CAP/AlgoTasks",
        task(
            &service,
            "iot://10.0.0.1/?deviceid=1",
            &receiver.url,
            "NEVER",
        ),
    );
    assert_eq!(status_code, 400, "{body}");
    assert!(
        body["msg"]
            .as_str()
            .unwrap()
            .contains("unsupported source iot://"),
        "{body}"
    );
}

/// Hostile streams end with a reason, through the real ffmpeg: bytes that are no
/// video fail the task with ffmpeg's words; a video that turns to garbage half
/// way is analysed as far as it decodes and then ends. Neither leaves the task
/// saying RUNNING.
#[test]
fn hostile_streams_end_with_a_reason() {
    let (_platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    let dir = server.data.path();
    // Not a video at all.
    let noise: Vec<u8> = (0..256 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("noise.mp4"), &noise).unwrap();
    // A transport stream whose second half is overwritten with noise.
    let clean = dir.join("clean.ts");
    let made = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args([
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
            "-t",
            "4",
        ])
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mpegts"])
        .arg(&clean)
        .status()
        .unwrap();
    assert!(made.success());
    let mut broken = std::fs::read(&clean).unwrap();
    let half = broken.len() / 2;
    for (byte, garbage) in broken[half..].iter_mut().zip(noise.iter().cycle()) {
        *byte = *garbage;
    }
    std::fs::write(dir.join("broken.ts"), &broken).unwrap();

    let url = |name: &str| format!("file://{}", dir.join(name).display());
    let noise_task = create(
        &server,
        task(&service, &url("noise.mp4"), &receiver.url, "NEVER"),
    );
    let broken_task = create(
        &server,
        task(&service, &url("broken.ts"), &receiver.url, "NEVER"),
    );
    assert!(
        wait_for(Duration::from_secs(30), || status(&server, &noise_task)
            == "ERROR"),
        "{}",
        detail(&server, &noise_task)
    );
    let why = detail(&server, &noise_task)["taskInfo"]["statusDesc"].to_string();
    assert!(why.contains("Invalid data"), "{why}");
    assert!(
        wait_for(Duration::from_secs(30), || matches!(
            status(&server, &broken_task).as_str(),
            "FINISHED" | "ERROR"
        )),
        "{}",
        detail(&server, &broken_task)
    );
    let progress = detail(&server, &broken_task)["taskInfo"]["progress"].clone();
    assert!(
        progress["framesAnalysed"].as_u64().unwrap() >= 5,
        "{progress}"
    );
}

/// A picture past the decoder's bound (8192 x 8192 pixels) is refused before
/// anything is allocated for it, through the real ffmpeg: a 65-byte PNG that
/// declares 9000 x 9000 fails its task with ffmpeg's reason (unbounded, ffmpeg
/// peaked at 137 MB resident on it; bounded, 54 MB).
#[test]
fn a_picture_past_the_bound_is_refused() {
    let (_platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut crc = crc32(kind);
        crc = crc32_more(crc, data);
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&(!crc).to_be_bytes());
        out
    };
    let mut header = 9000u32.to_be_bytes().to_vec();
    header.extend_from_slice(&9000u32.to_be_bytes());
    header.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &header));
    // The pixels: an empty zlib stream (the size is refused before they count).
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    let picture = server.data.path().join("huge.png");
    std::fs::write(&picture, &png).unwrap();
    let id = create(
        &server,
        task(
            &service,
            &format!("file://{}", picture.display()),
            &receiver.url,
            "NEVER",
        ),
    );
    assert!(
        wait_for(Duration::from_secs(30), || status(&server, &id) == "ERROR"),
        "{}",
        detail(&server, &id)
    );
    let why = detail(&server, &id)["taskInfo"]["statusDesc"].to_string();
    assert!(why.contains("exceeds specified max pixel count"), "{why}");
}

/// CRC-32 (PNG's) of `bytes`, not yet inverted at the end: feed `crc32_more`.
fn crc32(bytes: &[u8]) -> u32 {
    crc32_more(0xffff_ffff, bytes)
}

fn crc32_more(mut crc: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Pause stops decoding and events; resume brings them back. A receiver that was
/// down gets every event afterwards, in order, without duplicates.
#[test]
fn pause_stops_events_and_a_receiver_that_was_down_gets_them_all() {
    let (_platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    receiver
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let video = test_video(server.data.path(), "loop.mp4", 2, "320x240");
    // ALWAYS: the file starts again when it ends.
    let id = create(
        &server,
        task(
            &service,
            &format!("file://{}", video.display()),
            &receiver.url,
            "ALWAYS",
        ),
    );
    assert!(wait_for(Duration::from_secs(30), || status(&server, &id)
        == "RUNNING"));
    assert!(wait_for(Duration::from_secs(30), || {
        detail(&server, &id)["taskInfo"]["progress"]["eventsQueued"]
            .as_u64()
            .unwrap()
            >= 15
    }));
    let (code, _) = server.call(Method::POST, &format!("/CAP/AlgoTasks/{id}:pause"), None);
    assert_eq!(code, 200);
    assert_eq!(status(&server, &id), "PAUSED");
    let raised = detail(&server, &id)["taskInfo"]["progress"]["framesDecoded"].clone();
    assert!(raised.is_null(), "no pipeline while paused: {raised}");

    // The receiver comes back: everything queued arrives, in order, once.
    receiver
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(wait_for(Duration::from_secs(30), || {
        detail(&server, &id)["taskInfo"]["progress"]["eventsQueued"] == 0
    }));
    let events = receiver.events();
    assert!(events.len() >= 15, "{}", events.len());
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect();
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["timestamp"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "in order: {times:?}");
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "no duplicates");

    // Paused: nothing more comes.
    let settled = receiver.events().len();
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(receiver.events().len(), settled);
    let (code, _) = server.call(Method::POST, &format!("/CAP/AlgoTasks/{id}:resume"), None);
    assert_eq!(code, 200);
    assert!(wait_for(Duration::from_secs(30), || receiver
        .events()
        .len()
        > settled));
    assert_eq!(status(&server, &id), "RUNNING");
    let (code, _) = server.call(Method::DELETE, &format!("/CAP/AlgoTasks/{id}"), None);
    assert_eq!(code, 200);
}

/// A restart of xpud brings a running task back running, and what it had queued
/// for a receiver that was down is delivered afterwards, once.
#[test]
fn a_running_task_and_its_queue_survive_a_restart() {
    let (_platform, mut first, service) = passthrough_service();
    let receiver = EventReceiver::start();
    receiver
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let video = test_video(first.data.path(), "loop.mp4", 2, "320x240");
    let id = create(
        &first,
        task(
            &service,
            &format!("file://{}", video.display()),
            &receiver.url,
            "ALWAYS",
        ),
    );
    assert!(wait_for(Duration::from_secs(30), || {
        detail(&first, &id)["taskInfo"]["progress"]["eventsQueued"]
            .as_u64()
            .unwrap()
            >= 5
    }));
    first.shutdown();
    let data = first.data.path().to_path_buf();
    let second = TestServer::start_with(&[], |config| config.data_dir = data);
    reaches(&second, &id, "RUNNING", 30);
    receiver
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(wait_for(Duration::from_secs(30), || receiver
        .events()
        .len()
        >= 5));
    let events = receiver.events();
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "no duplicates");
}

/// Installs `package` as an algorithm and runs it as a CPU service; returns the
/// service id.
fn service_of(server: &TestServer, platform: &FileServer, id: &str, package: &[u8]) -> String {
    let algo = install_algorithm(server, platform, id, package);
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "", "replicas": 1, "gpuType": "CPU", "algoId": algo }),
    );
    assert_eq!(status, 200, "{body}");
    body["data"].as_str().unwrap().to_string()
}

/// The reference algorithm over the test scene: the square crossing the line raises
/// one LEFT_TO_RIGHT crossing, the one that enters the polygon and stays raises one
/// intrusion after the duration (no repeat within the interval), the masked one
/// raises nothing.
#[test]
fn area_intrusion_finds_the_crossing_and_the_stay_and_nothing_in_the_mask() {
    let platform = FileServer::start();
    let server = TestServer::start(&[]);
    let package = area_intrusion_package("bright_grid.onnx", &[]);
    let service = service_of(&server, &platform, "intrusion", &package);
    let receiver = EventReceiver::start();
    let scene = intrusion_scene(server.data.path());
    let task = json!({
        "algoServiceId": service,
        "restartPolicy": "NEVER",
        "taskInfo": {
            "labels": { "algoCabinName": "gate", "version": "1" },
            "rulesParams": [{
                "areas": [
                    { "areaid": 1, "areaType": "SINGLE_LINE",
                      "points": [{"x": 0.5, "y": 0.4}, {"x": 0.5, "y": 0.0}] },
                    { "areaid": 2, "areaType": "POLYGON",
                      "points": [{"x": 0.05, "y": 0.55}, {"x": 0.95, "y": 0.55},
                                 {"x": 0.95, "y": 0.98}, {"x": 0.05, "y": 0.98}] }
                ],
                "masks": [{ "areaid": 9, "areaType": "POLYGON",
                            "points": [{"x": 0.1, "y": 0.65}, {"x": 0.26, "y": 0.65},
                                       {"x": 0.26, "y": 0.85}, {"x": 0.1, "y": 0.85}] }],
                "destinations": { "HTTPDest": { "url": receiver.url },
                                  "eventDest": { "imageDest": { "fullImageDest": "frames",
                                                                "cropImageDest": "objects" } } },
                "eventType": "AREA_INTRUSION",
                "extendParams": { "sensitivity": "中", "durationThreshold": 1,
                                  "repeatAlarmIntervalThreshold": 720 },
                "labels": {}
            }],
            "streamOptions": { "videoStreamOptions": {
                "resolution": "PIXELS_200W", "url": format!("file://{}", scene.display()) } }
        }
    });
    let id = create(&server, task);
    reaches(&server, &id, "FINISHED", 60);
    assert!(wait_for(Duration::from_secs(10), || {
        detail(&server, &id)["taskInfo"]["progress"]["eventsQueued"] == 0
    }));
    let events = receiver.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    let line = events
        .iter()
        .find(|e| e["areaId"] == 1)
        .expect("the crossing");
    assert_eq!(line["eventType"], "AREA_INTRUSION");
    assert_eq!(line["areaType"], "SINGLE_LINE");
    assert_eq!(line["direction"], "LEFT_TO_RIGHT");
    let at = line["timestamp"].as_u64().unwrap();
    assert!((2400..=3000).contains(&at), "crossed at {at} ms");
    let bbox = &line["objects"][0]["bbox"];
    assert!((bbox["y"].as_f64().unwrap() - 0.14).abs() < 0.05, "{bbox}");
    let stay = events.iter().find(|e| e["areaId"] == 2).expect("the stay");
    assert_eq!(stay["areaType"], "POLYGON");
    let at = stay["timestamp"].as_u64().unwrap();
    assert!((1600..=2400).contains(&at), "alarmed at {at} ms");
    assert_ne!(line["objects"][0]["trackId"], stay["objects"][0]["trackId"]);
    // The rule asks for images: the analysed frame, and the object's box.
    assert_eq!(jpeg_size(&line["image"]), (1920, 1080));
    let (w, h) = jpeg_size(&line["objects"][0]["image"]);
    assert!(
        (60..=300).contains(&w) && (60..=300).contains(&h),
        "crop {w}x{h}"
    );
    // Which execution provider ran the detector, in the task and service details.
    let progress = &detail(&server, &id)["taskInfo"]["progress"];
    assert_eq!(progress["inference"], json!(["cpu"]), "{progress}");
    let (_, body) = server.get(&format!("/CAP/AlgoServices/{service}"));
    assert_eq!(
        body["data"]["replicasDetail"][0]["inference"],
        json!(["cpu"]),
        "{body}"
    );
}

/// A YOLOv8-shaped detector loads the same way (the package's env chooses its head):
/// its known boxes are decoded, suppressed and labelled.
#[test]
fn a_yolov8_head_is_decoded_end_to_end() {
    let platform = FileServer::start();
    let server = TestServer::start(&[]);
    let package = area_intrusion_package(
        "yolo_known.onnx",
        &[
            ("AREA_INTRUSION_HEAD", "yolov8"),
            ("AREA_INTRUSION_INPUT", "64x64"),
            ("AREA_INTRUSION_LABELS", "person,car"),
        ],
    );
    let service = service_of(&server, &platform, "yolo", &package);
    let receiver = EventReceiver::start();
    let video = test_video(server.data.path(), "one.mp4", 1, "320x240");
    let polygon = |id: i32, x0: f64, y0: f64, x1: f64, y1: f64| {
        json!({ "areaid": id, "areaType": "POLYGON", "points": [
            {"x": x0, "y": y0}, {"x": x1, "y": y0}, {"x": x1, "y": y1}, {"x": x0, "y": y1}] })
    };
    let task = json!({
        "algoServiceId": service,
        "restartPolicy": "NEVER",
        "taskInfo": {
            "labels": { "algoCabinName": "yard", "version": "1" },
            "rulesParams": [{
                // Around the person (centre 0.31, 0.31) and the car (0.75, 0.63).
                "areas": [polygon(1, 0.2, 0.2, 0.4, 0.4), polygon(2, 0.6, 0.5, 0.9, 0.8)],
                "destinations": { "HTTPDest": { "url": receiver.url } },
                "eventType": "YARD",
                "extendParams": { "sensitivity": 0.5 },
                "masks": []
            }],
            "streamOptions": { "videoStreamOptions": {
                "resolution": "PIXELS_200W", "url": format!("file://{}", video.display()) } }
        }
    });
    let id = create(&server, task);
    reaches(&server, &id, "FINISHED", 30);
    assert!(wait_for(Duration::from_secs(10), || receiver
        .events()
        .len()
        == 2));
    let events = receiver.events();
    let person = events.iter().find(|e| e["areaId"] == 1).unwrap();
    assert_eq!(person["label"], "person");
    assert_eq!(person["timestamp"], 0);
    let bbox = &person["objects"][0]["bbox"];
    assert!(
        (bbox["x"].as_f64().unwrap() - 15.0 / 64.0).abs() < 1e-6,
        "{bbox}"
    );
    assert!((person["objects"][0]["confidence"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    let car = events.iter().find(|e| e["areaId"] == 2).unwrap();
    assert_eq!(car["label"], "car");
}

/// An RTSP camera (PLAY over TCP): frames flow and the task is RUNNING; killed,
/// the task says it is reconnecting; back, the task runs again and events resume.
#[test]
fn an_rtsp_source_is_read_and_reconnected_when_it_comes_back() {
    let (_platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    let mut camera = RtspServer::start();
    let id = create(
        &server,
        task(&service, &camera.url, &receiver.url, "ALWAYS"),
    );
    reaches(&server, &id, "RUNNING", 30);
    assert!(wait_for(Duration::from_secs(20), || receiver
        .events()
        .len()
        >= 5));

    camera.stop();
    assert!(
        wait_for(Duration::from_secs(30), || detail(&server, &id)["taskInfo"]
            ["statusDesc"]
            .as_str()
            .unwrap()
            .starts_with("reconnecting (attempt ")),
        "{}",
        detail(&server, &id)
    );
    assert_eq!(status(&server, &id), "PENDING");
    camera.start_again();
    reaches(&server, &id, "RUNNING", 60);
    let before = receiver.events().len();
    assert!(wait_for(Duration::from_secs(20), || receiver
        .events()
        .len()
        >= before + 5));
    // Times go on across the reconnection.
    let times: Vec<u64> = receiver
        .events()
        .iter()
        .map(|e| e["timestamp"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
}

/// A hardware decoder that cannot run here (no NVIDIA driver on this machine) is
/// given up for CPU decode at once, and the task detail says so; nothing is lost.
#[test]
fn a_hardware_decoder_that_fails_falls_back_to_the_cpu_and_says_so() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("skipped: this machine has an NVIDIA device, where NVDEC would run");
        return;
    }
    let platform = FileServer::start();
    let server = TestServer::start_with(&[], |c| {
        c.video.hwaccel = xpud::tasks::HwaccelMode::Cuda;
    });
    let service = service_of(&server, &platform, "pt", &passthrough_package("XPUD-PT-HW"));
    let receiver = EventReceiver::start();
    let video = test_video(server.data.path(), "two.mp4", 2, "320x240");
    let id = create(
        &server,
        task(
            &service,
            &format!("file://{}", video.display()),
            &receiver.url,
            "ALWAYS",
        ),
    );
    assert!(wait_for(Duration::from_secs(30), || receiver
        .events()
        .len()
        >= 10));
    let progress = detail(&server, &id)["taskInfo"]["progress"].clone();
    let decoder = progress["decoder"].as_str().unwrap();
    assert!(decoder.starts_with("cpu (cuda unavailable: "), "{decoder}");
    assert_eq!(status(&server, &id), "RUNNING");
}

/// §7.1: creating, pausing, resuming and deleting other tasks, and pushing a package
/// and starting and deleting a service, never stall a running task: its frames keep
/// flowing (a live camera analysed at 5 fps never waits a second and a half).
#[test]
fn other_work_does_not_stall_a_running_task() {
    let (platform, server, service) = passthrough_service();
    let receiver = EventReceiver::start();
    let camera = RtspServer::start();
    let live = create(
        &server,
        task(&service, &camera.url, &receiver.url, "ALWAYS"),
    );
    assert!(wait_for(Duration::from_secs(30), || status(&server, &live)
        == "RUNNING"));
    let frames = |server: &TestServer| -> u64 {
        server.app.tasks.progress(&live).frames_decoded.unwrap_or(0)
    };
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Watches the live task from the side while the churn runs.
    let app = server.app.clone();
    let watcher = {
        let (watching, live) = (watching.clone(), live.clone());
        std::thread::spawn(move || {
            let mut last = (std::time::Instant::now(), 0u64);
            let mut worst = Duration::ZERO;
            while watching.load(std::sync::atomic::Ordering::SeqCst) {
                let now = app.tasks.progress(&live).frames_decoded.unwrap_or(0);
                if now != last.1 {
                    worst = worst.max(last.0.elapsed());
                    last = (std::time::Instant::now(), now);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            worst.max(last.0.elapsed())
        })
    };
    let started = frames(&server);
    let churn = std::time::Instant::now();
    let video = test_video(server.data.path(), "other.mp4", 2, "320x240");
    for round in 0..3 {
        let other = create(
            &server,
            task(
                &service,
                &format!("file://{}", video.display()),
                &receiver.url,
                "ALWAYS",
            ),
        );
        server.call(Method::POST, &format!("/CAP/AlgoTasks/{other}:pause"), None);
        server.call(
            Method::POST,
            &format!("/CAP/AlgoTasks/{other}:resume"),
            None,
        );
        let (url, md5) = platform.publish(
            &format!("other-{round}.tar.gz"),
            &passthrough_package(&format!("XPUD-PT-OTHER-{round}")),
        );
        server.post(
            "/CAP/AlgoFilePackages",
            json!({ "id": format!("other-{round}"), "md5": md5, "url": url }),
        );
        let (code, body) = server.post(
            "/CAP/AlgoServices",
            json!({ "envs": "", "replicas": 1, "gpuType": "CPU", "algoId": "pt-algo" }),
        );
        assert_eq!(code, 200, "{body}");
        let extra = body["data"].as_str().unwrap().to_string();
        std::thread::sleep(Duration::from_millis(300));
        server.call(Method::DELETE, &format!("/CAP/AlgoTasks/{other}"), None);
        server.call(Method::DELETE, &format!("/CAP/AlgoServices/{extra}"), None);
    }
    std::thread::sleep(Duration::from_millis(500));
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    let worst = watcher.join().unwrap();
    let analysed = frames(&server) - started;
    let elapsed = churn.elapsed().as_secs_f64();
    assert!(
        worst < Duration::from_millis(1500),
        "the live task waited {worst:?}"
    );
    assert!(
        analysed as f64 >= elapsed * 5.0 * 0.6,
        "{analysed} frames in {elapsed:.1} s"
    );
}

/// An algorithm that crashes on one frame: its worker is restarted by its
/// supervisor, the task's session reopens, analysis goes on from the next frames,
/// and a task of another service over the same video loses nothing.
#[test]
fn a_plugin_crash_mid_stream_restarts_its_worker_and_the_task_goes_on() {
    let (platform, server, passthrough) = passthrough_service();
    let wobbly = service_of(
        &server,
        &platform,
        "wobbly",
        &algorithm_package("wobbly", "XPUD-WOBBLY-0.1.0"),
    );
    let receiver = EventReceiver::start();
    let bystander = EventReceiver::start();
    // 10 s of black with one white flash at 1.0-1.1 s: the frame analysed at 1 s.
    let video = server.data.path().join("flash.mp4");
    let made = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y"])
        .args(["-f", "lavfi", "-i", "color=c=black:s=320x240:r=25:d=10"])
        .args(["-f", "lavfi", "-i", "color=c=white:s=320x240:r=25:d=10"])
        .args(["-filter_complex", "[0][1]overlay=enable='between(t,1,1.1)'"])
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(&video)
        .status()
        .unwrap();
    assert!(made.success());
    let url = format!("file://{}", video.display());
    let crashing = create(&server, task(&wobbly, &url, &receiver.url, "NEVER"));
    let steady = create(&server, task(&passthrough, &url, &bystander.url, "NEVER"));
    for id in [&crashing, &steady] {
        assert!(
            wait_for(Duration::from_secs(60), || status(&server, id)
                == "FINISHED"),
            "{}",
            detail(&server, id)
        );
    }
    let worker = server.app.services.workers(&wobbly).unwrap()[0].clone();
    assert_eq!(worker.status().crashes, 1, "{:?}", worker.status());
    let progress = detail(&server, &crashing)["taskInfo"]["progress"].clone();
    assert!(
        progress["framesFailed"].as_u64().unwrap() >= 1,
        "{progress}"
    );
    // Analysis went on after the crash: events from frames after the flash.
    assert!(wait_for(Duration::from_secs(10), || receiver
        .events()
        .iter()
        .any(|e| e["timestamp"].as_u64().unwrap() > 2000)));
    // The other service's task saw every frame.
    assert!(wait_for(Duration::from_secs(10), || bystander
        .events()
        .len()
        == 50));
    let progress = detail(&server, &steady)["taskInfo"]["progress"].clone();
    assert_eq!(progress["framesFailed"], 0, "{progress}");
}

/// Running pipelines are bounded (`[video] max-running-tasks`): past it, creating
/// or resuming a task is refused with the reason and changes nothing.
#[test]
fn running_tasks_are_bounded() {
    let platform = FileServer::start();
    let server = TestServer::start_with(&[], |c| c.video.max_running_tasks = 2);
    let service = service_of(
        &server,
        &platform,
        "pt",
        &passthrough_package("XPUD-PT-BOUND"),
    );
    let camera = "rtsp://127.0.0.1:9/nothing";
    let receiver = "http://127.0.0.1:9/events";
    let first = create(&server, task(&service, camera, receiver, "ALWAYS"));
    create(&server, task(&service, camera, receiver, "ALWAYS"));
    let count = || {
        server
            .post(
                "/CAP/AlgoTasks:search",
                json!({ "pageNumber": 1, "pageSize": 20 }),
            )
            .1["data"]["total"]
            .clone()
    };
    let (code, body) = server.post("/CAP/AlgoTasks", task(&service, camera, receiver, "ALWAYS"));
    assert_eq!(code, 409, "{body}");
    assert!(
        body["msg"].as_str().unwrap().contains("max-running-tasks"),
        "{body}"
    );
    assert_eq!(count(), 2);
    // A paused task frees its place; it cannot take it back while the place is taken.
    let (code, _) = server.call(Method::POST, &format!("/CAP/AlgoTasks/{first}:pause"), None);
    assert_eq!(code, 200);
    let third = create(&server, task(&service, camera, receiver, "ALWAYS"));
    let (code, body) = server.call(
        Method::POST,
        &format!("/CAP/AlgoTasks/{first}:resume"),
        None,
    );
    assert_eq!(code, 409, "{body}");
    assert_eq!(status(&server, &first), "PAUSED");
    let (code, _) = server.call(Method::DELETE, &format!("/CAP/AlgoTasks/{third}"), None);
    assert_eq!(code, 200);
    let (code, _) = server.call(
        Method::POST,
        &format!("/CAP/AlgoTasks/{first}:resume"),
        None,
    );
    assert_eq!(code, 200);
}

/// Kafka delivery (`eventDest.mqDest`): events queue while the broker is away
/// (the task says why), then all arrive once, in order, keyed by the task and on
/// one partition of the topic.
#[test]
fn events_reach_a_kafka_topic_in_order_once_the_broker_is_there() {
    let (_platform, server, service) = passthrough_service();
    let mut broker = KafkaBroker::reserve();
    let video = test_video(server.data.path(), "clip.mp4", 2, "320x240");
    let mut body = task(
        &service,
        &format!("file://{}", video.display()),
        "http://unused",
        "NEVER",
    );
    body["taskInfo"]["rulesParams"][0]["destinations"] = json!({
        "eventDest": { "mqDest": { "mqType": "KAFKA", "topic": "xpud.events", "url": broker.address } }
    });
    let id = create(&server, body);
    assert!(wait_for(Duration::from_secs(30), || status(&server, &id)
        == "FINISHED"));
    let progress = detail(&server, &id)["taskInfo"]["progress"].clone();
    assert_eq!(progress["eventsQueued"], 10, "{progress}");
    assert!(
        wait_for(Duration::from_secs(10), || {
            detail(&server, &id)["taskInfo"]["progress"]["deliveryError"]
                .as_str()
                .is_some_and(|e| e.contains(&format!("Kafka {}", broker.address)))
        }),
        "{}",
        detail(&server, &id)
    );

    broker.start();
    broker.create_topic("xpud.events", 3);
    assert!(
        wait_for(Duration::from_secs(30), || detail(&server, &id)["taskInfo"]
            ["progress"]["eventsQueued"]
            == 0),
        "{}",
        detail(&server, &id)
    );
    let progress = detail(&server, &id)["taskInfo"]["progress"].clone();
    assert_eq!(progress["eventsDelivered"], 10, "{progress}");
    assert!(progress["deliveryError"].is_null(), "{progress}");
    let records = broker.records("xpud.events");
    assert_eq!(records.len(), 10, "{records:?}");
    assert!(records
        .iter()
        .all(|(p, key, _)| *p == records[0].0 && key == &id));
    let events: Vec<serde_json::Value> = records
        .iter()
        .map(|(_, _, value)| serde_json::from_str(value).unwrap())
        .collect();
    let times: Vec<u64> = events
        .iter()
        .map(|e| e["timestamp"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "in order: {times:?}");
    let mut ids: Vec<&str> = events
        .iter()
        .map(|e| e["eventId"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10, "no duplicates");
    assert!(events.iter().all(|e| e["taskId"] == id.as_str()));
}

/// A Kafka destination the server cannot use is refused at create, naming the field.
#[test]
fn a_kafka_destination_is_checked_at_create() {
    let (_platform, server, service) = passthrough_service();
    let cases = [
        (
            json!({ "mqType": "RABBITMQ", "topic": "t", "url": "127.0.0.1:9092" }),
            "mqDest.mqType",
        ),
        (
            json!({ "mqType": "KAFKA", "topic": "a topic", "url": "127.0.0.1:9092" }),
            "mqDest.topic",
        ),
        (
            json!({ "mqType": "KAFKA", "topic": "t", "url": "kafka://127.0.0.1:9092" }),
            "mqDest.url",
        ),
        (
            json!({ "mqType": "KAFKA", "topic": "t", "url": "a:9092,b" }),
            "mqDest.url",
        ),
    ];
    for (mq, field) in cases {
        let mut body = task(&service, "file:///nowhere.mp4", "http://unused", "NEVER");
        body["taskInfo"]["rulesParams"][0]["destinations"] =
            json!({ "eventDest": { "mqDest": mq } });
        let (code, answer) = server.post("/CAP/AlgoTasks", body);
        assert_eq!(code, 400, "{mq}: {answer}");
        assert!(
            answer["msg"].as_str().unwrap().contains(field),
            "{mq}: {answer}"
        );
    }
    let (_, listed) = server.post(
        "/CAP/AlgoTasks:search",
        json!({ "pageNumber": 1, "pageSize": 10 }),
    );
    assert_eq!(listed["data"]["total"], 0, "{listed}");
}

/// The size of a base64 JPEG, from its SOF0 header.
fn jpeg_size(image: &serde_json::Value) -> (u16, u16) {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(image.as_str().expect("an image"))
        .unwrap();
    assert_eq!(&bytes[..2], &[0xFF, 0xD8], "a JPEG");
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG");
    let at = |i: usize| u16::from_be_bytes([bytes[sof + i], bytes[sof + i + 1]]);
    (at(7), at(5))
}

/// A card that turns unhealthy: the service's replica on it is placed again on the
/// healthy card (a new partition there, the old one gone), the task analysing on it
/// follows and runs again, and the task detail says so.
#[test]
fn a_replica_on_a_card_that_turns_unhealthy_moves_and_its_task_follows() {
    let failing = FailingCard::start();
    let server = &failing.server;
    let platform = FileServer::start();
    let algo = install_algorithm(
        server,
        &platform,
        "pt",
        &passthrough_package("XPUD-PT-MOVE"),
    );
    let (status, body) = server.post(
        "/CAP/AlgoServices",
        json!({ "envs": "", "replicas": 1, "gpuType": "CHAOS_TEST", "algoId": algo }),
    );
    assert_eq!(status, 200, "{body}");
    let service = body["data"].as_str().unwrap().to_string();
    let card_of_replica = || {
        server.get(&format!("/CAP/AlgoServices/{service}")).1["data"]["replicasDetail"][0]["card"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(card_of_replica(), "chaos/0");
    let receiver = EventReceiver::start();
    let video = test_video(server.data.path(), "loop.mp4", 2, "320x240");
    let id = create(
        server,
        task(
            &service,
            &format!("file://{}", video.display()),
            &receiver.url,
            "ALWAYS",
        ),
    );
    reaches(server, &id, "RUNNING", 30);

    failing.fail();
    assert!(
        wait_for(Duration::from_secs(20), || card_of_replica() == "chaos/1"),
        "{}",
        server.get(&format!("/CAP/AlgoServices/{service}")).1
    );
    let moves = || detail(server, &id)["taskInfo"]["replicaMoves"].clone();
    assert!(
        wait_for(Duration::from_secs(10), || moves()
            .as_array()
            .is_some_and(|m| !m.is_empty())),
        "{}",
        detail(server, &id)
    );
    let moved = &moves()[0];
    assert_eq!(moved["from"], "chaos/0");
    assert_eq!(moved["to"], "chaos/1");
    assert_eq!(moved["reason"], "card unhealthy");
    // The task analyses again, on the new card: events keep coming.
    reaches(server, &id, "RUNNING", 30);
    let before = receiver.events().len();
    assert!(wait_for(Duration::from_secs(20), || receiver
        .events()
        .len()
        > before + 3));
    // One partition, on the healthy card.
    let partitions = reported_partitions(server, "chaos");
    assert_eq!(partitions.len(), 1, "{partitions:?}");
    assert_eq!(partitions[0].spec.device_index, 1);
}

/// An algorithm slower than the analysis rate: a live camera is not waited for.
/// Frames it had no time for are replaced by newer ones and counted as dropped, so
/// analysis stays near the camera's present; a file is read no faster than it is
/// analysed, and every frame is analysed.
#[test]
fn a_slow_algorithm_skips_a_live_camera_s_frames_but_never_a_file_s() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use xpud::pipeline::decode::Settings;
    use xpud::pipeline::source::Source;
    use xpud::pipeline::{Analyse, Pipeline, Report, Spec, State};
    use xpud::runtime::bindings::analyzer::Event;
    use xpud::runtime::frames::Frame;

    /// Takes 300 ms a frame: half the 5 fps it is fed.
    struct Slow;
    impl Analyse for Slow {
        fn analyse(&self, _: &Frame) -> Result<Vec<Event>, String> {
            std::thread::sleep(Duration::from_millis(300));
            Ok(Vec::new())
        }
    }
    struct Quiet;
    impl Report for Quiet {
        fn state(&self, _: State) {}
        fn events(&self, _: &Frame, _: Vec<Event>) {}
    }
    let spec = |source: &str| Spec {
        task: "slow".into(),
        source: Source::parse(source).unwrap(),
        settings: Settings {
            fps: 5.0,
            width: 160,
            height: 120,
            skip_unreferenced: true,
        },
        hwaccel: None,
        retry_forever: false,
        ffmpeg: "ffmpeg".into(),
    };

    let camera = RtspServer::start();
    let mut live = Pipeline::start(spec(&camera.url), Arc::new(Slow), Arc::new(Quiet)).unwrap();
    let stats = live.stats.clone();
    assert!(
        wait_for(Duration::from_secs(30), || stats
            .frames_dropped
            .load(Ordering::Relaxed)
            >= 3),
        "{stats:?}"
    );
    live.stop();
    let (decoded, analysed, dropped) = (
        stats.frames_decoded.load(Ordering::Relaxed),
        stats.frames_analysed.load(Ordering::Relaxed),
        stats.frames_dropped.load(Ordering::Relaxed),
    );
    assert!(analysed >= 2, "{stats:?}");
    // Each decoded frame was analysed, dropped, or was the one left at the stop.
    assert!(
        analysed + dropped <= decoded && decoded <= analysed + dropped + 1,
        "{stats:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let video = test_video(dir.path(), "two.mp4", 2, "320x240");
    let mut file = Pipeline::start(
        spec(&format!("file://{}", video.display())),
        Arc::new(Slow),
        Arc::new(Quiet),
    )
    .unwrap();
    let stats = file.stats.clone();
    // 2 s at 5 fps: 10 frames, 300 ms each.
    assert!(
        wait_for(Duration::from_secs(30), || stats
            .frames_analysed
            .load(Ordering::Relaxed)
            >= 10),
        "{stats:?}"
    );
    file.stop();
    assert_eq!(stats.frames_dropped.load(Ordering::Relaxed), 0, "{stats:?}");
    assert_eq!(
        stats.frames_analysed.load(Ordering::Relaxed),
        stats.frames_decoded.load(Ordering::Relaxed)
    );
}

/// The pipeline alone, over a stand-in for ffmpeg (a shell script), with an
/// algorithm that finds nothing and a report that keeps every state.
mod over_a_stand_in {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};
    use xpud::pipeline::decode::{Hwaccel, Settings};
    use xpud::pipeline::source::Source;
    use xpud::pipeline::{Analyse, Pipeline, Report, Spec, State};
    use xpud::runtime::bindings::analyzer::Event;
    use xpud::runtime::frames::Frame;

    pub struct Idle;
    impl Analyse for Idle {
        fn analyse(&self, _: &Frame) -> Result<Vec<Event>, String> {
            Ok(Vec::new())
        }
    }

    #[derive(Default)]
    pub struct States(Mutex<Vec<State>>);
    impl Report for States {
        fn state(&self, state: State) {
            self.0.lock().unwrap().push(state);
        }
        fn events(&self, _: &Frame, _: Vec<Event>) {}
    }
    impl States {
        pub fn seen(&self) -> Vec<State> {
            self.0.lock().unwrap().clone()
        }
    }

    /// A camera's pipeline (160x120 at 5 fps) whose ffmpeg is `script`, in `dir`.
    pub fn start(dir: &Path, script: &str, retry_forever: bool) -> (Pipeline, Arc<States>) {
        start_with(dir, script, retry_forever, None, Arc::new(Idle))
    }

    /// The same, trying `hwaccel` first, analysed by `analyse`.
    pub fn start_with(
        dir: &Path,
        script: &str,
        retry_forever: bool,
        hwaccel: Option<Hwaccel>,
        analyse: Arc<dyn Analyse>,
    ) -> (Pipeline, Arc<States>) {
        let ffmpeg: PathBuf = dir.join("ffmpeg");
        std::fs::write(&ffmpeg, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&ffmpeg, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = Spec {
            task: "stand-in".into(),
            source: Source::parse("rtsp://127.0.0.1:9/camera").unwrap(),
            settings: Settings {
                fps: 5.0,
                width: 160,
                height: 120,
                skip_unreferenced: true,
            },
            hwaccel,
            retry_forever,
            ffmpeg,
        };
        let states = Arc::new(States::default());
        let pipeline = Pipeline::start(spec, analyse, states.clone()).unwrap();
        (pipeline, states)
    }

    /// One 160x120 RGB frame on stdout.
    pub const ONE_FRAME: &str = "head -c 57600 /dev/zero";
}

/// A decoder that stays alive but gives no frame (a camera sending audio only,
/// keep-alives, or data that never decodes: no socket timeout fires) is stopped
/// once a frame is overdue, and the source is opened again: the task is never
/// left "running" over a silent stream, and says why it reconnects.
#[test]
fn a_decoder_that_goes_silent_is_stopped_and_the_source_opened_again() {
    use xpud::pipeline::decode::FRAME_OVERDUE;
    use xpud::pipeline::State;

    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let script = format!("{}\nexec sleep 600", over_a_stand_in::ONE_FRAME);
    let (mut pipeline, states) = over_a_stand_in::start(dir.path(), &script, true);
    let reconnecting = || {
        states.seen().into_iter().find_map(|s| match s {
            State::Reconnecting { reason, .. } => Some(reason),
            _ => None,
        })
    };
    assert!(
        wait_for(Duration::from_secs(40), || reconnecting().is_some()),
        "{:?}",
        states.seen()
    );
    let waited = started.elapsed();
    pipeline.stop();
    let seen = states.seen();
    assert_eq!(seen[1], State::Running, "{seen:?}");
    let reason = reconnecting().unwrap();
    assert!(
        reason.starts_with("no next frame from the source in 10 s"),
        "{reason}"
    );
    // Not before the frame was overdue (10 s and three intervals at 5 fps).
    assert!(waited >= FRAME_OVERDUE, "{waited:?}");
}

/// A decoder that dies without a word (a crash on a hostile stream, the OOM
/// killer) ends the run as a failure: the task says so and, under ALWAYS,
/// reconnects. It used to be taken for a stop: the pipeline ended and the task
/// kept saying RUNNING.
#[test]
fn a_decoder_killed_without_a_word_is_a_failure_not_a_stop() {
    use xpud::pipeline::State;

    let dir = tempfile::tempdir().unwrap();
    let script = format!("{}\nkill -9 $$", over_a_stand_in::ONE_FRAME);
    let (mut pipeline, states) = over_a_stand_in::start(dir.path(), &script, false);
    let failed = || {
        states.seen().into_iter().find_map(|s| match s {
            State::Failed(reason) => Some(reason),
            _ => None,
        })
    };
    assert!(
        wait_for(Duration::from_secs(20), || failed().is_some()),
        "{:?}",
        states.seen()
    );
    pipeline.stop();
    let reason = failed().unwrap();
    assert!(reason.contains("SIGKILL"), "{reason}");
    assert_eq!(states.seen()[1], State::Running);
}

/// What a hostile stream can make the decoder take is bounded: pictures past 8K
/// are refused by ffmpeg itself (`-max_pixels`, an input option), and should
/// memory run out anyway, the kernel's OOM killer takes the decoder first.
#[test]
fn the_decoder_is_bounded_and_the_first_to_go_when_memory_runs_out() {
    use xpud::pipeline::State;

    let dir = tempfile::tempdir().unwrap();
    // Says how it was started and what its OOM score is once running.
    let script = format!(
        "here=$(dirname \"$0\")\necho \"$@\" > \"$here/args\"\nsleep 0.5\n\
         cat /proc/$$/oom_score_adj > \"$here/adj\"\n{}\nexec sleep 600",
        over_a_stand_in::ONE_FRAME
    );
    let (mut pipeline, states) = over_a_stand_in::start(dir.path(), &script, true);
    assert!(
        wait_for(Duration::from_secs(20), || states
            .seen()
            .contains(&State::Running)),
        "{:?}",
        states.seen()
    );
    pipeline.stop();
    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    let bound = args.find("-max_pixels 67108864").expect(&args);
    assert!(
        bound < args.find(" -i ").unwrap(),
        "an input option: {args}"
    );
    let adj = std::fs::read_to_string(dir.path().join("adj")).unwrap();
    assert_eq!(adj.trim(), "1000");
}

/// A source that fails (a camera down) fails on every decoder: the hardware
/// decoder is not blamed for it. The CPU is tried at once, gives no frame either,
/// and the next try decodes on the hardware again; the task detail never says
/// the hardware decoder is unavailable because a camera was.
#[test]
fn a_source_that_fails_does_not_cost_the_hardware_decoder() {
    use xpud::pipeline::decode::Hwaccel;
    use xpud::pipeline::State;

    let dir = tempfile::tempdir().unwrap();
    // Every run, hardware or not, as ffmpeg fails on a camera that is down.
    let script = "echo \"$@\" >> \"$(dirname \"$0\")/runs\"\n\
                  echo 'Connection to tcp://127.0.0.1:9 failed: Connection refused' >&2\nexit 1";
    let (mut pipeline, states) = over_a_stand_in::start_with(
        dir.path(),
        script,
        true,
        Some(Hwaccel::Cuda { device: 0 }),
        std::sync::Arc::new(over_a_stand_in::Idle),
    );
    let tries = || {
        states
            .seen()
            .iter()
            .filter(|s| matches!(s, State::Reconnecting { .. }))
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(20), || tries() >= 2),
        "{:?}",
        states.seen()
    );
    // In the second backoff (a second long): back on the hardware decoder.
    let decoder = pipeline.stats.decoder.lock().unwrap().clone();
    pipeline.stop();
    assert_eq!(decoder, "cuda");
    // Each try: the hardware decoder, then the CPU at once.
    let runs = std::fs::read_to_string(dir.path().join("runs")).unwrap();
    let hardware: Vec<bool> = runs.lines().map(|r| r.contains("-hwaccel cuda")).collect();
    assert!(hardware.len() >= 4, "{runs}");
    assert_eq!(&hardware[..4], &[true, false, true, false], "{runs}");
}

/// RUNNING means frames are analysed, not merely decoded: an algorithm that fails
/// every frame (a plugin marked unhealthy) while the stream flows on makes the
/// task pending again with the error, once that has lasted; the first frame it
/// analyses again makes it running. One failed frame changes nothing.
#[test]
fn a_task_whose_frames_all_fail_analysis_is_not_running() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use xpud::pipeline::{Analyse, State, NOT_ANALYSING_AFTER};
    use xpud::runtime::bindings::analyzer::Event;
    use xpud::runtime::frames::Frame;

    #[derive(Default)]
    struct Switch(AtomicBool);
    impl Analyse for Switch {
        fn analyse(&self, _: &Frame) -> Result<Vec<Event>, String> {
            if self.0.load(Ordering::Relaxed) {
                Err("plugin unhealthy: 5 crashes in 60 s".into())
            } else {
                Ok(Vec::new())
            }
        }
    }
    let failing = Arc::new(Switch::default());
    failing.0.store(true, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    // A camera: a frame every 100 ms, for as long as it is read.
    let script = format!(
        "while :; do {}; sleep 0.1; done",
        over_a_stand_in::ONE_FRAME
    );
    let (mut pipeline, states) =
        over_a_stand_in::start_with(dir.path(), &script, true, None, failing.clone());
    let not_analysed = |s: &State| {
        matches!(s, State::Waiting(why)
            if why == "frames arrive but are not analysed: plugin unhealthy: 5 crashes in 60 s")
    };
    // Failing from the first frame: pending, with the reason, at once.
    assert!(
        wait_for(Duration::from_secs(10), || states
            .seen()
            .iter()
            .any(not_analysed)),
        "{:?}",
        states.seen()
    );
    assert!(!states.seen().contains(&State::Running));
    failing.0.store(false, Ordering::Relaxed);
    assert!(
        wait_for(Duration::from_secs(10), || states
            .seen()
            .contains(&State::Running)),
        "{:?}",
        states.seen()
    );
    // Failing again: still running until that has lasted.
    let before = states.seen().len();
    failing.0.store(true, Ordering::Relaxed);
    let started = std::time::Instant::now();
    assert!(
        wait_for(Duration::from_secs(20), || states.seen()[before..]
            .iter()
            .any(not_analysed)),
        "{:?}",
        states.seen()
    );
    assert!(started.elapsed() >= NOT_ANALYSING_AFTER);
    pipeline.stop();
    assert_eq!(states.seen().len(), before + 1, "{:?}", states.seen());
}

/// A bug that panics the pipeline's thread ends the task as failed with what
/// happened: its status never stays at what it said last.
#[test]
fn a_pipeline_that_panics_fails_its_task() {
    use std::sync::Arc;
    use xpud::pipeline::{Analyse, State};
    use xpud::runtime::bindings::analyzer::Event;
    use xpud::runtime::frames::Frame;

    struct Buggy;
    impl Analyse for Buggy {
        fn analyse(&self, _: &Frame) -> Result<Vec<Event>, String> {
            panic!("index out of bounds");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let script = format!("{}\nexec sleep 600", over_a_stand_in::ONE_FRAME);
    let (mut pipeline, states) =
        over_a_stand_in::start_with(dir.path(), &script, true, None, Arc::new(Buggy));
    let failed = State::Failed("internal error in the pipeline: index out of bounds".into());
    assert!(
        wait_for(Duration::from_secs(10), || states.seen().contains(&failed)),
        "{:?}",
        states.seen()
    );
    pipeline.stop();
}

/// A camera that sends a frame and hangs up, again and again, is backed off
/// like one that sends none: reconnections start over only after a run that
/// lasted, not at every first frame (which restarted ffmpeg twice a second).
#[test]
fn a_camera_that_hangs_up_after_a_frame_is_backed_off() {
    use xpud::pipeline::State;

    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{}\necho 'Connection reset by peer' >&2\nexit 1",
        over_a_stand_in::ONE_FRAME
    );
    let (mut pipeline, states) = over_a_stand_in::start(dir.path(), &script, true);
    let attempts = || -> Vec<u32> {
        states
            .seen()
            .iter()
            .filter_map(|s| match s {
                State::Reconnecting { attempt, .. } => Some(*attempt),
                _ => None,
            })
            .collect()
    };
    assert!(
        wait_for(Duration::from_secs(20), || attempts().len() >= 3),
        "{:?}",
        states.seen()
    );
    pipeline.stop();
    assert_eq!(&attempts()[..3], &[1, 2, 3], "{:?}", states.seen());
}
