// Expert reads without the interpreter: native threads pread page-aligned ranges into buffers the caller owns.
//
// The offloading store's Python reader threads each needed the interpreter lock to start a read, to wrap its bytes
// and to complete its future, so a read that landed while the model ran Python between its kernels waited for the
// model (and the model, handing the lock over, waited for them). Here a read is a job of pieces (fd, file offset,
// bytes, buffer address); `threads` native threads take the pieces of the oldest job first, each thread a piece, so
// one expert split into pieces is read at the threads' depth; the model's thread polls `done` or blocks in
// `wait_any` with the lock released. The caller keeps every buffer alive until its job is taken (`take`)
// or cancelled before it started (`cancel`); `close` finishes the running jobs and drops the queued ones.
//
// A gather job (an expert not read in place: its page-aligned reads would pad it out, or its parts lie apart) reads
// into a bounce buffer of the engine's own, pooled here, and the thread that finishes its last piece copies the byte
// ranges into the caller's buffers before the job counts as finished: the copy runs without the interpreter too.
// A bounce buffer is held from the job's first piece to its end: a job in use has a piece running, or is the
// queue's front with pieces left to hand out, so at most `threads` + 1 are in use at once (`threads` for
// single-piece gathers, small experts).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <deque>
#include <mutex>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <unistd.h>

namespace py = pybind11;

namespace {

constexpr int64_t kPage = 4096;
constexpr int64_t kMaxCall = 0x7ffff000;  // Linux transfers at most this many bytes per read call

// (fd, page-aligned file offset, page-aligned bytes to read, bytes needed, buffer address, opened with O_DIRECT)
using Piece = std::tuple<int, int64_t, int64_t, int64_t, uintptr_t, bool>;
// (offset in the bounce buffer, destination address, bytes): a gather job's copies once its reads are in
using Copy = std::tuple<int64_t, uintptr_t, int64_t>;

struct Job {
  std::vector<Piece> pieces;  // a gather job's addresses are offsets into its bounce buffer
  int64_t bounce_size = 0;    // > 0: a gather job
  char* bounce = nullptr;     // from its first piece to its end
  std::vector<Copy> copies;
  size_t handed = 0;   // pieces taken by a thread so far (in order)
  size_t running = 0;  // pieces taken and not finished
  bool started = false, finished = false;
  int error = 0;        // errno of the failed piece (the first one); -1: the file ended before the bytes needed
  int64_t failed = -1;  // index of the failed piece
  int64_t got = 0;      // bytes the failed piece read
  int64_t bytes = 0;    // bytes read in all
  std::chrono::steady_clock::time_point start;
  double seconds = 0;
};

// Reads one piece; returns 0, an errno, or -1 when the file ends first. `got`: bytes read.
int read_piece(const Piece& p, int64_t& got) {
  auto [fd, offset, length, need, addr, direct] = p;
  char* buf = reinterpret_cast<char*>(addr);
  got = 0;
  while (got < length) {
    ssize_t n = pread(fd, buf + got, static_cast<size_t>(std::min(length - got, kMaxCall & ~(kPage - 1))),
                      offset + got);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) break;
    got += n;
    if (direct && got % kPage) break;  // O_DIRECT returns a partial block only at the end of the file
  }
  return got < need ? -1 : 0;
}

class ReadEngine {
 public:
  explicit ReadEngine(int threads) {
    for (int i = 0; i < std::max(threads, 1); ++i) workers_.emplace_back([this] { run(); });
  }
  ~ReadEngine() {
    close();
    for (char* b : idle_) std::free(b);
  }

  // Wakes one reader, after letting go of the lock; that reader wakes the next while pieces are left (`run`). Each
  // wake is a system call on the caller's thread, the model's: waking every reader here cost it ~55 us a read in
  // the replay (bench/offload_speed.py), one ~40, while the readers start their pieces a wake apart.
  int64_t submit(std::vector<Piece> pieces, int64_t bounce, std::vector<Copy> copies) {
    int64_t id;
    size_t n = pieces.size();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) throw std::runtime_error("expert read engine is closed");
      id = next_++;
      Job& j = jobs_[id];
      j.pieces = std::move(pieces);
      j.bounce_size = (bounce + kPage - 1) / kPage * kPage;
      j.copies = std::move(copies);
      if (n == 0) j.finished = true;
      else queue_.push_back(id);
    }
    if (n == 0) landed_.notify_all();
    else work_.notify_one();
    return id;
  }

  // True if the job had not started: it never will, and its buffers are free at once.
  bool cancel(int64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || it->second.started) return false;
    for (auto q = queue_.begin(); q != queue_.end(); ++q)
      if (*q == id) {
        queue_.erase(q);
        break;
      }
    jobs_.erase(it);
    return true;
  }

  bool done(int64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = jobs_.find(id);
    return it == jobs_.end() || it->second.finished;
  }

  // Blocks (without the interpreter lock: bound with a call guard) until one of `ids` has finished; returns it.
  int64_t wait_any(const std::vector<int64_t>& ids) {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      for (int64_t id : ids) {
        auto it = jobs_.find(id);
        if (it == jobs_.end() || it->second.finished) return id;
      }
      landed_.wait(lock);
    }
  }

  // A finished job's outcome (error, failed piece, bytes it got, bytes read, seconds), forgotten after.
  std::tuple<int, int64_t, int64_t, int64_t, double> take(int64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = jobs_.find(id);
    if (it == jobs_.end() || !it->second.finished) throw std::runtime_error("expert read not finished");
    Job& j = it->second;
    auto out = std::make_tuple(j.error, j.failed, j.got, j.bytes, j.seconds);
    jobs_.erase(it);
    return out;
  }

  void close() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      stopping_ = true;
      for (int64_t id : queue_) {
        Job& j = jobs_[id];
        if (!j.started) {
          jobs_.erase(id);
          continue;
        }
        j.handed = j.pieces.size();  // its running pieces finish it, as cancelled
        if (!j.error) j.error = ECANCELED, j.failed = 0;
        if (j.running == 0) finish(j);
      }
      queue_.clear();
      work_.notify_all();
    }
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

 private:
  void run() {
    for (;;) {
      int64_t id;
      size_t i;
      Piece piece;
      bool skip, more;
      {
        std::unique_lock<std::mutex> lock(mu_);
        work_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;
        id = queue_.front();
        Job& j = jobs_[id];
        if (!j.started) {
          j.started = true, j.start = std::chrono::steady_clock::now();
          if (j.bounce_size && !(j.bounce = acquire(j.bounce_size))) j.error = ENOMEM, j.failed = 0;
        }
        i = j.handed++;
        if (j.handed == j.pieces.size()) queue_.pop_front();
        ++j.running;
        piece = j.pieces[i];
        std::get<4>(piece) += reinterpret_cast<uintptr_t>(j.bounce);  // nullptr (0) unless a gather job
        skip = j.error != 0;  // a piece failed: the job has failed, read no more of it
        more = !queue_.empty();
      }
      if (more) work_.notify_one();  // pieces left: the next reader takes one while this one reads
      int64_t got = 0;
      int error = skip ? 0 : read_piece(piece, got);
      bool last = false;
      const Job* copying = nullptr;
      {
        std::lock_guard<std::mutex> lock(mu_);
        Job& j = jobs_[id];  // kept while a piece runs (close and cancel drop only jobs not started)
        --j.running;
        j.bytes += got;
        if (error && (!j.error || static_cast<int64_t>(i) < j.failed))
          j.error = error, j.failed = static_cast<int64_t>(i), j.got = got;
        last = j.handed == j.pieces.size() && j.running == 0;
        if (last && !j.error && !j.copies.empty()) copying = &j;  // nothing else touches it until it is finished
        else if (last) finish(j);
      }
      if (copying) {
        for (const auto& [from, to, n] : copying->copies)
          std::memcpy(reinterpret_cast<char*>(to), copying->bounce + from, static_cast<size_t>(n));
        std::lock_guard<std::mutex> lock(mu_);
        finish(jobs_[id]);
      }
      if (last) landed_.notify_all();
    }
  }

  // Marks a job finished and gives its bounce buffer back (the lock held).
  void finish(Job& j) {
    j.finished = true;
    j.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - j.start).count();
    if (j.bounce) {
      if (idle_.size() < workers_.size() && bounce_sizes_[j.bounce] == j.bounce_size) idle_.push_back(j.bounce);
      else bounce_sizes_.erase(j.bounce), std::free(j.bounce);
      j.bounce = nullptr;
    }
  }

  // A page-aligned bounce buffer of `size` bytes: an idle one of that size, else a new one (the lock held).
  char* acquire(int64_t size) {
    for (size_t k = 0; k < idle_.size(); ++k)
      if (bounce_sizes_[idle_[k]] == size) {
        char* b = idle_[k];
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(k));
        return b;
      }
    if (!idle_.empty()) {  // another size: at most `threads` kept, so let an idle one go
      bounce_sizes_.erase(idle_.back()), std::free(idle_.back());
      idle_.pop_back();
    }
    char* b = static_cast<char*>(std::aligned_alloc(kPage, static_cast<size_t>(size)));
    if (b != nullptr) bounce_sizes_[b] = size;
    return b;  // nullptr: out of memory, the job fails with ENOMEM
  }

  std::mutex mu_;
  std::condition_variable work_, landed_;
  std::deque<int64_t> queue_;
  std::unordered_map<int64_t, Job> jobs_;
  std::vector<std::thread> workers_;
  std::vector<char*> idle_;                            // bounce buffers kept for the next gather jobs
  std::unordered_map<char*, int64_t> bounce_sizes_;    // every bounce buffer allocated and not freed: its size
  int64_t next_ = 0;
  bool stopping_ = false;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<ReadEngine>(m, "ReadEngine")
      .def(py::init<int>(), py::arg("threads"))
      .def("submit", &ReadEngine::submit, py::arg("pieces"), py::arg("bounce") = 0,
           py::arg("copies") = std::vector<Copy>{},
           "queue a read of pieces (fd, offset, bytes, needed, address, direct); with `bounce` bytes, a gather: the "
           "addresses are offsets into a bounce buffer of that size, whose ranges `copies` (offset, address, bytes) "
           "are copied out once the reads are in")
      .def("cancel", &ReadEngine::cancel, "drop a read that has not started; False if it has")
      .def("done", &ReadEngine::done)
      .def("wait_any", &ReadEngine::wait_any, "block until one of the reads has finished; returns it", nogil)
      .def("take", &ReadEngine::take, "(errno or -1 short, failed piece, its bytes, bytes read, seconds)")
      .def("close", &ReadEngine::close, "finish the running reads, drop the queued ones, stop the threads", nogil);
}
