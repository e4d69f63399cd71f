// Exchange viewer: the patient's studies from every permitted site, shown as the
// broker's rendered frames (lossless PNG, windowed on the server). No DICOM reaches
// the page unless the user holds export and asks for a download.
"use strict";
(function () {
  const KEY = "exchange.viewer";
  const PRESETS = { lung: [-600, 1500], bone: [300, 1500], soft: [40, 400], brain: [40, 80] };
  const PRESET_KEYS = { 1: "lung", 2: "bone", 3: "soft", 4: "brain" };
  const PURPOSES = {
    TREAT: "treatment",
    ETREAT: "emergency treatment (break-the-glass)",
    HOPERAT: "operations",
    PATRQT: "patient request",
  };
  const CACHE_SIZE = 240;
  const PREFETCH = 4;
  const WINDOW_DEBOUNCE_MS = 60;
  const CINE_FPS = 10;
  const $ = (id) => document.getElementById(id);

  const state = {
    studies: [],
    study: null,
    series: null,
    images: [],
    index: 0,
    window: null, // [center, width] or null: the image's own window, chosen by the server
    zoom: 1,
    panX: 0,
    panY: 0,
    tool: "wl",
    cine: null,
    drawn: 0,
    shown: null,
    firstImageMs: null,
    seq: 0,
  };
  window.__viewer = state; // read by the end-to-end tests
  const cache = new Map();

  // -- session ---------------------------------------------------------------------------
  function loadSession() {
    try {
      return JSON.parse(sessionStorage.getItem(KEY) || "{}") || {};
    } catch (_) {
      return {};
    }
  }
  function saveSession(value) {
    sessionStorage.setItem(KEY, JSON.stringify(value));
  }
  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(atob(part + "===".slice((part.length + 3) % 4)));
    } catch (_) {
      return {};
    }
  }
  const session = loadSession();
  const main = session.main;
  const claims = main ? claimsOf(main.access_token) : {};
  const role = claims.role || "";
  const emergency =
    session.emergency && session.breakGlass
      ? { token: session.emergency.access_token, reason: session.breakGlass.reason, study: session.breakGlass.study }
      : null;

  // -- HTTP ------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(message, status) {
      super(message);
      this.status = status;
    }
  }
  async function reasonOf(response) {
    try {
      const body = await response.json();
      if (body && Array.isArray(body.issue)) {
        const said = body.issue.map((i) => i.diagnostics || (i.details && i.details.text)).filter(Boolean);
        if (said.length) return said.join("; ");
      }
      if (body && (body.error_description || body.error)) return String(body.error_description || body.error);
    } catch (_) {
      /* not JSON */
    }
    return `the exchange answered ${response.status}`;
  }
  async function call(url, access, accept) {
    const headers = { Authorization: `Bearer ${access.token}`, Accept: accept };
    if (access.reason) headers["X-Break-Glass-Reason"] = access.reason;
    const response = await fetch(url, { headers });
    if (!response.ok) throw new ApiError(await reasonOf(response), response.status);
    return response;
  }
  const ordinary = () => ({ token: main.access_token, reason: null });
  async function fhir(path, access) {
    const response = await call(`/fhir/${path}`, access || ordinary(), "application/fhir+json");
    return response.json();
  }

  // -- banner ----------------------------------------------------------------------------
  function patientId() {
    return String(main.patient || claims.patient || "").replace(/^Patient\//, "");
  }
  function mayRead(type) {
    const scope = ` ${main.scope || claims.scope || ""} `;
    const re = new RegExp(`\\s(user|patient)/(\\*|${type})\\.(\\*|read|[cud]*r[uds]*)\\s`);
    return re.test(scope);
  }
  async function banner() {
    const id = patientId();
    $("patient-name").textContent = id ? `Patient/${id}` : "no patient in context";
    if (id && mayRead("Patient")) {
      try {
        const patient = await fhir(`Patient/${encodeURIComponent(id)}`);
        const name = (patient.name || [])[0] || {};
        const shown = [name.family, (name.given || []).join(" ")].filter(Boolean).join(", ");
        if (shown) $("patient-name").textContent = shown;
        bannerFromRecord = Boolean(shown);
        const details = [];
        if (patient.birthDate) details.push(`born ${patient.birthDate}`);
        if (patient.gender) details.push(patient.gender);
        details.push(`id ${id}`);
        $("patient-details").textContent = details.join(" · ");
      } catch (_) {
        $("patient-details").textContent = "";
      }
    }
    showPurpose();
  }
  let bannerFromRecord = false;
  function bannerFromImages(attributes) {
    // The patient's name and birth date as the images' header states them.
    if (bannerFromRecord) return;
    const name = first(attributes, "00100010");
    const alphabetic = name && typeof name === "object" ? String(name.Alphabetic || "") : "";
    if (!alphabetic) return;
    const [family, given] = alphabetic.split("^");
    $("patient-name").textContent = [family, given].filter(Boolean).join(", ");
    const birth = String(first(attributes, "00100030") || "");
    const details = [];
    if (/^\d{8}$/.test(birth)) details.push(`born ${birth.slice(0, 4)}-${birth.slice(4, 6)}-${birth.slice(6)}`);
    const sex = first(attributes, "00100040");
    if (sex) details.push(`sex ${sex}`);
    details.push(`id ${patientId()}`);
    $("patient-details").textContent = details.join(" · ");
  }
  function showPurpose() {
    const purpose = $("purpose");
    const who = [claims.sub, claims.org ? `(${claims.org})` : ""].filter(Boolean).join(" ");
    const study = state.study;
    if (study && study.emergency) {
      purpose.className = "emergency";
      purpose.textContent = `Purpose of use: ETREAT — ${PURPOSES.ETREAT}. Reason: ${emergency.reason}`;
      return;
    }
    purpose.className = "";
    if (main.source === "access-code") {
      purpose.textContent = "Patient access with an access code: your own studies";
      return;
    }
    const codes = claims.purpose_of_use || [];
    const said = codes.map((c) => `${c} — ${PURPOSES[c] || c}`).join(", ") || "none stated";
    const basis = study ? ` · under ${study.basis}` : "";
    purpose.textContent = `Purpose of use: ${said}${basis} · signed in as ${who || role}`;
  }

  // -- studies ---------------------------------------------------------------------------
  function siteOf(endpoint) {
    const org = endpoint && endpoint.managingOrganization;
    if (!org) return { name: "an unknown site", org: null };
    const ref = String(org.reference || "");
    const id = ref.startsWith("Organization/") ? ref.slice(13) : null;
    return { name: org.display || id || "an unknown site", org: id };
  }
  function brokerOf(endpoint) {
    const address = endpoint && endpoint.address ? String(endpoint.address) : "";
    return address.startsWith(`${location.origin}/`) ? address.slice(location.origin.length) : "/dicomweb";
  }
  function studyOf(resource, endpoints, access, flags) {
    const ref = ((resource.endpoint || [])[0] || {}).reference || "";
    const endpoint = endpoints[ref.replace(/^Endpoint\//, "")];
    const site = siteOf(endpoint);
    const uid = ((resource.identifier || []).find((i) => i.system === "urn:dicom:uid") || {}).value || "";
    const study = {
      id: resource.id,
      uid: uid.replace(/^urn:oid:/, ""),
      resource,
      site: site.name,
      siteOrg: site.org,
      base: brokerOf(endpoint),
      access,
      emergency: Boolean(flags && flags.emergency),
      basis: flags && flags.emergency ? "break-the-glass" : basisOf(site.org),
    };
    return study;
  }
  function basisOf(siteOrg) {
    if (main.source === "access-code" || role === "patient") return "the patient's own access";
    if (siteOrg && claims.org === siteOrg) return "your organisation's own study";
    return "the patient's consent (HIE sharing rules)";
  }
  async function endpointsFor(resources) {
    const endpoints = {};
    for (const r of resources) if (r.resourceType === "Endpoint") endpoints[r.id] = r;
    return endpoints;
  }
  async function loadStudies() {
    const id = patientId();
    const found = [];
    if (id) {
      const query = `ImagingStudy?patient=${encodeURIComponent(id)}&_include=ImagingStudy:endpoint&_count=100&_sort=-started`;
      const bundle = await fhir(query);
      const resources = (bundle.entry || []).map((e) => e.resource);
      const endpoints = await endpointsFor(resources);
      for (const r of resources) {
        if (r.resourceType === "ImagingStudy") found.push(studyOf(r, endpoints, ordinary()));
      }
    }
    state.studies = found;
    const context = (main.fhirContext || [])
      .map((c) => String(c.reference || ""))
      .filter((r) => r.startsWith("ImagingStudy/"))
      .map((r) => r.slice(13));
    for (const studyId of context) {
      if (emergency && emergency.study === studyId) continue;
      if (!found.some((s) => s.id === studyId)) await contextStudy(studyId);
    }
    if (emergency) await emergencyStudy();
    renderStudies();
  }
  async function readStudy(studyId, access) {
    const resource = await fhir(`ImagingStudy/${encodeURIComponent(studyId)}`, access);
    let endpoints = {};
    const ref = ((resource.endpoint || [])[0] || {}).reference || "";
    if (ref.startsWith("Endpoint/")) {
      try {
        const endpoint = await fhir(ref, access);
        endpoints = { [endpoint.id]: endpoint };
      } catch (_) {
        endpoints = {};
      }
    }
    return { resource, endpoints };
  }
  async function contextStudy(studyId) {
    try {
      const { resource, endpoints } = await readStudy(studyId);
      state.studies.unshift(studyOf(resource, endpoints, ordinary()));
    } catch (error) {
      showRefusal(studyId, error.message);
    }
  }
  async function emergencyStudy() {
    const access = { token: emergency.token, reason: emergency.reason };
    try {
      const { resource, endpoints } = await readStudy(emergency.study, access);
      state.studies.unshift(studyOf(resource, endpoints, access, { emergency: true }));
      $("end-emergency").hidden = false;
    } catch (error) {
      showRefusal(emergency.study, `even with break-the-glass: ${error.message}`);
    }
  }
  function showRefusal(studyId, reason) {
    const box = document.createElement("div");
    box.className = "refusal";
    box.setAttribute("role", "alert");
    box.dataset.study = studyId;
    const title = document.createElement("strong");
    title.textContent = "The study open in your EHR cannot be shown";
    const text = document.createElement("p");
    text.className = "refusal-reason";
    text.textContent = reason.charAt(0).toUpperCase() + reason.slice(1);
    box.append(title, text);
    if (role === "clinician" && !(emergency && emergency.study === studyId)) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "danger break-glass";
      button.textContent = "Break the glass…";
      button.addEventListener("click", () => openGlass(studyId));
      box.append(button);
    }
    $("refused").append(box);
  }
  function dateOf(resource) {
    return String(resource.started || "").slice(0, 10) || "date unknown";
  }
  function modalitiesOf(resource) {
    return (resource.modality || []).map((m) => m.code).filter(Boolean).join("/") || "?";
  }
  function renderStudies() {
    const list = $("studies");
    list.replaceChildren();
    if (!state.studies.length) {
      const empty = document.createElement("li");
      empty.className = "empty";
      empty.textContent = "No studies you may see.";
      list.append(empty);
    }
    for (const study of state.studies) {
      const item = document.createElement("li");
      item.className = `study${study.emergency ? " emergency" : ""}`;
      item.dataset.study = study.id;
      const button = document.createElement("button");
      button.type = "button";
      const head = document.createElement("span");
      head.textContent = `${dateOf(study.resource)} · ${modalitiesOf(study.resource)} · ${study.resource.description || "(no description)"}`;
      const meta = document.createElement("span");
      meta.className = "meta";
      const site = document.createElement("span");
      site.className = "site";
      site.textContent = study.site;
      meta.append(site, ` · ${study.resource.numberOfSeries || 0} series, ${study.resource.numberOfInstances || 0} images`);
      if (study.emergency) meta.append(" · EMERGENCY ACCESS");
      button.append(head, meta);
      button.addEventListener("click", () => selectStudy(study));
      item.append(button);
      list.append(item);
    }
  }

  // -- series ----------------------------------------------------------------------------
  function selectStudy(study) {
    state.study = study;
    study.thumbs = false;
    for (const b of $("studies").querySelectorAll("li")) {
      const button = b.querySelector("button");
      if (button) button.setAttribute("aria-current", String(b.dataset.study === study.id));
    }
    showPurpose();
    updateDownload();
    const list = $("series");
    list.replaceChildren();
    const series = study.resource.series || [];
    series.forEach((s, n) => {
      const item = document.createElement("li");
      item.className = "series-item";
      item.dataset.series = s.uid;
      const button = document.createElement("button");
      button.type = "button";
      const thumb = document.createElement("img");
      thumb.alt = "";
      const text = document.createElement("span");
      const modality = (s.modality && s.modality.code) || "";
      text.textContent = `S${s.number != null ? s.number : n + 1} ${modality} ${s.description || ""}`;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `${s.numberOfInstances || (s.instance || []).length} images`;
      text.append(meta);
      button.append(thumb, text);
      button.addEventListener("click", () => selectSeries(s));
      item.append(button);
      list.append(item);
    });
    if (series.length) selectSeries(series[0]);
    else status("This study has no series.", true);
  }
  async function thumbnails(study) {
    for (const item of $("series").querySelectorAll("li")) {
      const img = item.querySelector("img");
      if (!img || img.src) continue;
      const url = `${study.base}/studies/${study.uid}/series/${item.dataset.series}/thumbnail`;
      try {
        const response = await call(url, study.access, "image/png");
        if (state.study !== study) return;
        img.src = URL.createObjectURL(await response.blob());
      } catch (_) {
        img.alt = "no thumbnail";
      }
    }
  }
  function selectSeries(series) {
    stopCine();
    state.series = series;
    for (const item of $("series").querySelectorAll("li")) {
      item.querySelector("button").setAttribute("aria-current", String(item.dataset.series === series.uid));
    }
    const instances = [...(series.instance || [])].sort((a, b) => (a.number || 0) - (b.number || 0));
    state.images = instances.map((i) => ({ sop: i.uid, frame: 1, number: i.number, center: null, width: null }));
    state.index = 0;
    state.window = null;
    resetView();
    show();
    refineSeries(state.study, series);
  }
  function first(attributes, tag) {
    const element = attributes[tag];
    return element && element.Value && element.Value.length ? element.Value[0] : null;
  }
  async function refineSeries(study, series) {
    // Frames per instance and stated windows come from the series metadata (a view).
    let metadata;
    try {
      const url = `${study.base}/studies/${study.uid}/series/${series.uid}/metadata`;
      metadata = await (await call(url, study.access, "application/dicom+json")).json();
    } catch (error) {
      status(`Series details unavailable: ${error.message}`, true);
      return;
    }
    if (state.series !== series) return;
    if (metadata.length) bannerFromImages(metadata[0]);
    const current = state.images[state.index];
    const instances = metadata
      .map((m) => ({
        sop: first(m, "00080018"),
        number: Number(first(m, "00200013") || 0),
        frames: Math.max(1, Number(first(m, "00280008") || 1)),
        center: first(m, "00281050"),
        width: first(m, "00281051"),
        modality: first(m, "00080060"),
      }))
      .filter((i) => i.sop)
      .sort((a, b) => a.number - b.number);
    const images = [];
    for (const i of instances) {
      for (let f = 1; f <= i.frames; f++) {
        images.push({ sop: i.sop, frame: f, number: i.number, center: i.center, width: i.width, modality: i.modality });
      }
    }
    if (!images.length) return;
    state.images = images;
    const kept = current ? images.findIndex((i) => i.sop === current.sop && i.frame === current.frame) : -1;
    state.index = Math.max(0, kept);
    overlay();
    prefetch();
  }

  // -- images ----------------------------------------------------------------------------
  function number(value) {
    return Number.isInteger(value) ? String(value) : value.toFixed(2);
  }
  function frameUrl(image, win) {
    const study = state.study;
    let url = `${study.base}/studies/${study.uid}/series/${state.series.uid}/instances/${image.sop}/frames/${image.frame}/rendered`;
    if (win) url += `?window=${number(win[0])},${number(win[1])}`;
    return url;
  }
  async function fetchBitmap(url, access) {
    const response = await call(url, access, "image/png");
    const blob = await response.blob();
    return createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  }
  function bitmap(url) {
    let promise = cache.get(url);
    if (promise) {
      cache.delete(url);
      cache.set(url, promise);
      return promise;
    }
    promise = fetchBitmap(url, state.study.access);
    promise.catch(() => cache.delete(url));
    cache.set(url, promise);
    while (cache.size > CACHE_SIZE) {
      const [oldest, old] = cache.entries().next().value;
      cache.delete(oldest);
      old.then((b) => b.close()).catch(() => {});
    }
    return promise;
  }
  async function show() {
    const image = state.images[state.index];
    if (!image) return;
    const seq = ++state.seq;
    const url = frameUrl(image, state.window);
    overlay();
    try {
      const bmp = await bitmap(url);
      if (seq !== state.seq) return;
      draw(bmp, image);
      status("");
    } catch (error) {
      if (seq === state.seq) status(`This image cannot be shown: ${error.message}`, true);
      return;
    }
    prefetch();
    if (!state.study.thumbs) {
      // After the first image (never before it): small images of every series.
      state.study.thumbs = true;
      thumbnails(state.study);
    }
  }
  function draw(bmp, image) {
    const canvas = $("image");
    if (canvas.width !== bmp.width || canvas.height !== bmp.height) {
      canvas.width = bmp.width;
      canvas.height = bmp.height;
    }
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(bmp, 0, 0);
    state.drawn += 1;
    state.shown = { sop: image.sop, frame: image.frame, index: state.index, window: state.window };
    canvas.dataset.sop = image.sop;
    canvas.dataset.frame = String(image.frame);
    canvas.dataset.index = String(state.index);
    canvas.dataset.window = state.window ? `${state.window[0]},${state.window[1]}` : "default";
    canvas.dataset.drawn = String(state.drawn);
    if (state.firstImageMs === null) {
      state.firstImageMs = performance.now();
      canvas.dataset.firstImageMs = state.firstImageMs.toFixed(0);
    }
    layout();
    overlay();
  }
  function prefetch() {
    if (!state.study) return;
    for (let d = 1; d <= PREFETCH; d++) {
      for (const n of [state.index + d, state.index - d]) {
        if (n >= 0 && n < state.images.length) bitmap(frameUrl(state.images[n], state.window)).catch(() => {});
      }
    }
  }
  function overlay() {
    const image = state.images[state.index];
    if (!image) return;
    const win = state.window ? `W ${number(state.window[1])} L ${number(state.window[0])}` : "W/L: image default";
    $("overlay").textContent =
      `Image ${state.index + 1}/${state.images.length}` +
      (image.frame > 1 || (state.images[state.index + 1] || {}).sop === image.sop ? ` · frame ${image.frame}` : "") +
      `\n${win} · zoom ${(state.zoom * 100).toFixed(0)}%`;
    $("viewport").setAttribute(
      "aria-label",
      `Image ${state.index + 1} of ${state.images.length}, ${win}. Arrow keys change image.`,
    );
  }
  function go(index) {
    if (!state.images.length) return;
    const next = Math.min(state.images.length - 1, Math.max(0, index));
    if (next === state.index) return;
    state.index = next;
    show();
  }
  function setWindow(win) {
    state.window = win;
    showSoon();
  }
  let pending = null;
  function showSoon() {
    overlay();
    if (pending) clearTimeout(pending);
    pending = setTimeout(() => {
      pending = null;
      show();
    }, WINDOW_DEBOUNCE_MS);
  }
  function currentWindow() {
    if (state.window) return state.window;
    const image = state.images[state.index] || {};
    if (image.center != null && image.width != null) return [Number(image.center), Number(image.width)];
    return image.modality === "CT" || (state.series && state.series.modality && state.series.modality.code === "CT")
      ? [40, 400]
      : [128, 256];
  }
  function preset(name) {
    if (name === "default") {
      state.window = null;
      show();
      return;
    }
    state.window = PRESETS[name].slice();
    show();
  }

  // -- zoom and pan ----------------------------------------------------------------------
  function resetView() {
    state.zoom = 1;
    state.panX = 0;
    state.panY = 0;
    layout();
  }
  function layout() {
    const canvas = $("image");
    const view = $("viewport");
    const w = canvas.width;
    const h = canvas.height;
    const fit = Math.min(view.clientWidth / w, view.clientHeight / h) || 1;
    const scale = fit * state.zoom;
    const x = (view.clientWidth - w * scale) / 2 + state.panX;
    const y = (view.clientHeight - h * scale) / 2 + state.panY;
    canvas.style.transform = `translate(${x}px, ${y}px) scale(${scale})`;
    canvas.classList.toggle("pixelated", scale > 2);
  }
  function zoomBy(factor) {
    state.zoom = Math.min(16, Math.max(0.25, state.zoom * factor));
    layout();
    overlay();
  }

  // -- cine ------------------------------------------------------------------------------
  function stopCine() {
    if (state.cine) clearInterval(state.cine);
    state.cine = null;
    $("cine").setAttribute("aria-pressed", "false");
  }
  function toggleCine() {
    if (state.cine) {
      stopCine();
      return;
    }
    if (state.images.length < 2) return;
    $("cine").setAttribute("aria-pressed", "true");
    state.cine = setInterval(() => {
      state.index = (state.index + 1) % state.images.length;
      show();
    }, 1000 / CINE_FPS);
  }

  // -- download (only where the token holds export) ----------------------------------------
  function mayExport(study) {
    if (!study || study.emergency) return false;
    if (main.source === "access-code" || role === "patient") return true;
    return role === "clinician" && Boolean(claims.org) && study.siteOrg === claims.org;
  }
  function updateDownload() {
    $("download").hidden = !mayExport(state.study);
  }
  function indexOf(bytes, pattern, from) {
    outer: for (let i = from; i <= bytes.length - pattern.length; i++) {
      for (let j = 0; j < pattern.length; j++) if (bytes[i + j] !== pattern[j]) continue outer;
      return i;
    }
    return -1;
  }
  async function download() {
    const study = state.study;
    const image = state.images[state.index];
    if (!mayExport(study) || !image) return;
    const url = `${study.base}/studies/${study.uid}/series/${state.series.uid}/instances/${image.sop}`;
    try {
      const response = await call(url, study.access, 'multipart/related; type="application/dicom"');
      const type = response.headers.get("content-type") || "";
      const boundary = (/boundary="?([^";]+)"?/i.exec(type) || [])[1];
      const bytes = new Uint8Array(await response.arrayBuffer());
      const enc = new TextEncoder();
      const start = indexOf(bytes, enc.encode("\r\n\r\n"), 0) + 4;
      const end = boundary ? indexOf(bytes, enc.encode(`\r\n--${boundary}`), start) : bytes.length;
      const blob = new Blob([bytes.slice(start, end < 0 ? bytes.length : end)], { type: "application/dicom" });
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = `${image.sop}.dcm`;
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (error) {
      status(`Download refused: ${error.message}`, true);
    }
  }

  // -- break the glass -------------------------------------------------------------------
  let glassStudy = null;
  function openGlass(studyId) {
    glassStudy = studyId;
    $("glass-reason").value = "";
    $("glass-dialog").showModal();
    $("glass-reason").focus();
  }
  function breakGlass(event) {
    event.preventDefault();
    // An HTTP header carries the reason: printable ASCII only.
    const reason = $("glass-reason").value.normalize("NFKD").replace(/[^\x20-\x7e]/g, "").trim();
    if (reason.length < 5) {
      $("glass-reason").setCustomValidity("State the emergency (at least 5 characters).");
      $("glass-reason").reportValidity();
      return;
    }
    const saved = loadSession();
    saved.breakGlass = { study: glassStudy, reason };
    delete saved.emergency;
    saveSession(saved);
    // Ask the HIE's authorization server for an ETREAT token: it decides, not the viewer.
    const params = new URLSearchParams({ iss: main.iss || `${location.origin}/fhir`, purpose: "ETREAT" });
    if (main.launch) params.set("launch", main.launch);
    location.assign(`/viewer/launch?${params}`);
  }
  function endEmergency() {
    const saved = loadSession();
    delete saved.emergency;
    delete saved.breakGlass;
    saveSession(saved);
    location.reload();
  }

  // -- input -----------------------------------------------------------------------------
  function status(text, error) {
    $("status").textContent = text;
    $("status").classList.toggle("error", Boolean(error));
  }
  function setTool(tool) {
    state.tool = tool;
    $("tool-wl").setAttribute("aria-pressed", String(tool === "wl"));
    $("tool-pan").setAttribute("aria-pressed", String(tool === "pan"));
    $("viewport").classList.toggle("panning", tool === "pan");
  }
  function wire() {
    const view = $("viewport");
    let drag = null;
    let wheelRest = 0;
    view.addEventListener(
      "wheel",
      (event) => {
        event.preventDefault();
        if (event.ctrlKey) {
          zoomBy(event.deltaY < 0 ? 1.15 : 1 / 1.15);
          return;
        }
        wheelRest += event.deltaY;
        const steps = Math.trunc(wheelRest / 50) || Math.sign(wheelRest);
        wheelRest = 0;
        go(state.index + steps);
      },
      { passive: false },
    );
    view.addEventListener("pointerdown", (event) => {
      view.focus();
      const pan = state.tool === "pan" || event.button === 1 || event.shiftKey;
      drag = { x: event.clientX, y: event.clientY, pan, panX: state.panX, panY: state.panY, win: currentWindow() };
      view.setPointerCapture(event.pointerId);
      event.preventDefault();
    });
    view.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const dx = event.clientX - drag.x;
      const dy = event.clientY - drag.y;
      if (drag.pan) {
        state.panX = drag.panX + dx;
        state.panY = drag.panY + dy;
        layout();
        return;
      }
      const sensitivity = Math.max(1, drag.win[1] / 256);
      const width = Math.max(1, Math.round(drag.win[1] + dx * sensitivity));
      const center = Math.round(drag.win[0] + dy * sensitivity);
      setWindow([center, width]);
    });
    const end = () => {
      drag = null;
    };
    view.addEventListener("pointerup", end);
    view.addEventListener("pointercancel", end);
    document.addEventListener("keydown", (event) => {
      if ($("glass-dialog").open || /^(INPUT|TEXTAREA|SELECT)$/.test(event.target.tagName)) return;
      if (event.altKey || event.metaKey || event.ctrlKey) return;
      const key = event.key;
      if (event.shiftKey && key.startsWith("Arrow")) {
        const [c, w] = currentWindow();
        const step = Math.max(1, Math.round(w / 20));
        if (key === "ArrowLeft") setWindow([c, Math.max(1, w - step)]);
        if (key === "ArrowRight") setWindow([c, w + step]);
        if (key === "ArrowUp") setWindow([c + step, w]);
        if (key === "ArrowDown") setWindow([c - step, w]);
      } else if (state.tool === "pan" && key.startsWith("Arrow")) {
        const d = 20;
        if (key === "ArrowLeft") state.panX -= d;
        if (key === "ArrowRight") state.panX += d;
        if (key === "ArrowUp") state.panY -= d;
        if (key === "ArrowDown") state.panY += d;
        layout();
      } else if (key === "ArrowDown" || key === "ArrowRight" || key === "PageDown") go(state.index + 1);
      else if (key === "ArrowUp" || key === "ArrowLeft" || key === "PageUp") go(state.index - 1);
      else if (key === "Home") go(0);
      else if (key === "End") go(state.images.length - 1);
      else if (key === "+" || key === "=") zoomBy(1.25);
      else if (key === "-") zoomBy(0.8);
      else if (key === "0") resetView();
      else if (PRESET_KEYS[key]) preset(PRESET_KEYS[key]);
      else if (key === "d" || key === "D") preset("default");
      else if (key === "w" || key === "W") setTool("wl");
      else if (key === "p" || key === "P") setTool("pan");
      else if (key === "c" || key === "C") toggleCine();
      else if (key === "?") toggleHelp();
      else return;
      event.preventDefault();
    });
    $("tool-wl").addEventListener("click", () => setTool("wl"));
    $("tool-pan").addEventListener("click", () => setTool("pan"));
    $("zoom-in").addEventListener("click", () => zoomBy(1.25));
    $("zoom-out").addEventListener("click", () => zoomBy(0.8));
    $("zoom-fit").addEventListener("click", resetView);
    $("prev").addEventListener("click", () => go(state.index - 1));
    $("next").addEventListener("click", () => go(state.index + 1));
    $("cine").addEventListener("click", toggleCine);
    $("download").addEventListener("click", download);
    $("help-button").addEventListener("click", toggleHelp);
    for (const button of document.querySelectorAll(".preset")) {
      button.addEventListener("click", () => preset(button.dataset.preset));
    }
    $("glass-form").addEventListener("submit", breakGlass);
    $("glass-reason").addEventListener("input", () => $("glass-reason").setCustomValidity(""));
    $("glass-cancel").addEventListener("click", () => $("glass-dialog").close());
    $("end-emergency").addEventListener("click", endEmergency);
    window.addEventListener("resize", layout);
  }
  function toggleHelp() {
    const help = $("help");
    help.hidden = !help.hidden;
    $("help-button").setAttribute("aria-expanded", String(!help.hidden));
  }

  // -- start -----------------------------------------------------------------------------
  async function start() {
    if (!main || !main.access_token) {
      $("signin").hidden = false;
      $("layout").hidden = true;
      $("banner").hidden = true;
      return;
    }
    wire();
    const banner$ = banner();
    try {
      await loadStudies();
    } catch (error) {
      status(`The studies cannot be listed: ${error.message}`, true);
      return;
    }
    const chosen = state.studies.find((s) => s.emergency) || state.studies[0];
    if (chosen) selectStudy(chosen);
    await banner$;
    showPurpose();
  }
  start();
})();
