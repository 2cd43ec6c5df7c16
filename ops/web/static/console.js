// The mesh console's one script: a job page follows its job's trace stream (server-sent events)
// and appends each event as text (never as markup); when the job ends, the page reloads once to
// show the final state. No framework, no build step.
"use strict";

// How long a page waits before asking again for a stream the server refused.
const RETRY_MS = 10000;

function follow(box) {
  const job = box.dataset.job;
  const status = document.getElementById("live-status");
  const list = document.createElement("pre");
  list.className = "timeline live-events";
  box.appendChild(list);
  let after = box.dataset.after;  // the last event shown: where a new stream goes on from

  function open() {
    const url = "/jobs/" + encodeURIComponent(job) + "/events?after=" + encodeURIComponent(after);
    const source = new EventSource(url);
    source.onmessage = function (message) {
      if (message.lastEventId) {
        after = message.lastEventId;
      }
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
      if (source.readyState === EventSource.CLOSED) {
        // refused (a 503 when the server holds as many streams as it takes, a 401 once logged out):
        // EventSource gives up for good on an answer that is not a stream, so try again later
        status.textContent = "Live updates are unavailable now (the server refused the stream); " +
                             "trying again in " + (RETRY_MS / 1000) + " s.";
        window.setTimeout(open, RETRY_MS);
      } else {
        status.textContent = "Reconnecting…";
      }
    };
    source.onopen = function () {
      status.textContent = "Following the job: events appear here as they happen.";
    };
  }

  open();
}

document.addEventListener("DOMContentLoaded", function () {
  const box = document.getElementById("live");
  if (box && box.dataset.follow === "yes") {
    follow(box);
  }
});
