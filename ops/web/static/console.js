// The mesh console's one script: a job page follows its job's trace stream (server-sent events)
// and appends each event as text (never as markup); when the job ends, the page reloads once to
// show the final state. No framework, no build step.
"use strict";

function follow(box) {
  const job = box.dataset.job;
  const status = document.getElementById("live-status");
  const list = document.createElement("pre");
  list.className = "timeline live-events";
  box.appendChild(list);
  const url = "/jobs/" + encodeURIComponent(job) + "/events?after=" + encodeURIComponent(box.dataset.after);
  const source = new EventSource(url);
  source.onmessage = function (message) {
    const ev = JSON.parse(message.data);
    const line = document.createElement("div");
    line.textContent = ev.line;
    if (ev.style) {
      line.className = ev.style.split(" ").map(function (s) { return "s-" + s; }).join(" ");
    }
    line.dataset.event = ev.event || "";
    list.appendChild(line);
  };
  source.addEventListener("end", function () {
    source.close();
    status.textContent = "The job has ended.";
    window.setTimeout(function () { window.location.reload(); }, 500);  // the last lines are seen first
  });
  source.onerror = function () {
    status.textContent = "Reconnecting…";
  };
  source.onopen = function () {
    status.textContent = "Following the job: events appear here as they happen.";
  };
}

document.addEventListener("DOMContentLoaded", function () {
  const box = document.getElementById("live");
  if (box && box.dataset.follow === "yes") {
    follow(box);
  }
});
